PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test setup demo clean default-model check-docs gpu-check
setup: $(VENV)/.ok
$(VENV)/.ok: requirements.txt requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

# tests/test_default_model.py runs the real default model: fetched and converted first (once; both are no-ops after).
# Offline those tests skip and say why; in CI (CI=true) they must run, so a failed fetch fails the build.
test: setup
	$(MAKE) --no-print-directory default-model || [ "$$CI" != true ]
	$(BIN)/python -m pytest -q tests

default-model: checkpoints/smollm2-135m-instruct/config.json
checkpoints/smollm2-135m-instruct/config.json:
	$(BIN)/python fetch.py model
	$(BIN)/python convert_hf.py --default

# The main job on the default model: fetch and convert SmolLM2-135M-Instruct and the data, let the model answer 832
# real questions with its own 4-bit weights (its own chats: the distillation data, 64 held out), train exits 15,18,21
# on them, score every exit, then answer three chat prompts at each exit and at full depth, side by side, in int4.
demo: setup
	$(BIN)/python fetch.py all
	$(BIN)/python convert_hf.py --default
	$(BIN)/python chat_data.py --quantize int4
	$(BIN)/python train.py --exit-layers 15,18,21
	$(BIN)/python eval.py --exits 15,18,21,full --tasks arc_easy,piqa,heldout_chat --limit 200
	$(BIN)/python demo.py --exits 15,18,21,full --quantize int4

# After make demo: runs every command of README.md and docs/*.md that needs nothing more and finishes in a few minutes,
# in a scratch copy of the repository (tests/test_docs.py; make test checks them all without running them).
check-docs: setup
	CHECK_DOCS=1 $(BIN)/python -m pytest -q tests/test_docs.py -k runs --durations=0

# Everything a GPU owes in one command, about 8 minutes on one H100/H200 (docs/gpu.md): the CUDA tests, a training
# step and decoding at the Llama-3-8B shape, decoding and a distillation on the default model. Results, small files,
# in out/gpu-check/. On a machine whose own python holds a CUDA torch: python gpu_check.py
gpu-check: setup
	$(BIN)/python gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache
