"""The internals of :mod:`mineru_vram.ray`: the actors, the job report, placement.

:mod:`.actor` (the session each actor owns, :class:`DocumentParser`, :class:`ParserActor`),
:mod:`.report` (:class:`JobReport` and its records) and :mod:`.placement` (:func:`gpu_share`).
Every module here imports Ray; only :mod:`mineru_vram.ray` imports them, after it has
checked that Ray is installed (importing :mod:`mineru_vram` never imports Ray).
"""
