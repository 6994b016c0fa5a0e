"""What a MinerU render worker runs first when a session of ours started it (as ``__mp_main__``).

multiprocessing's ``spawn`` child runs the parent's main module first; for render
workers started inside a parse, ``_adapter`` names this module instead of the
user's script (which may be unguarded). It only quiets pypdfium2's per-bitmap
"potentially unsafe operation" warning, which MinerU's renderer triggers on every
page it closes and which no user can act on.
"""

import logging

logging.getLogger("pypdfium2._helpers.bitmap").setLevel(logging.ERROR)
