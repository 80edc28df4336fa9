# Two commands for a fresh machine: `make serve` and `make test` (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARTIFACT ?= artifacts/default
OUT ?= runs/mine
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: serve test test-fast install install-test artifact finetune clean gpu-wheels gpu-data gpu-check

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

# The suite without the end-to-end tests marked slow (live servers, the README walkthrough, compile).
test-fast: install
	$(PY) -m pytest -q -m 'not slow'

artifact: install
	@# (re-)export when there is no artifact, it is from an older orthserve, or the built-in weights are newer
	if $(PY) -m export.builtin $(ARTIFACT); then $(PY) -m export --model orthserve-mini --pretrained default \
		--classnames orthserve/weights/orthserve-mini.classes.txt --int8 --out $(ARTIFACT); fi

# Fine-tune the built-in model on DATA (one sub-folder of images per class); ARGS adds training options.
finetune: install
	@test -n "$(DATA)" || { echo "usage: make finetune DATA=path/to/images [OUT=runs/mine] [ARGS='--shots 8 --epochs 20']" >&2; exit 2; }
	$(PY) -m training.finetune --data $(DATA) --out $(OUT) $(ARGS)

serve: artifact
	ORTHSERVE_MODEL=$(ARTIFACT) $(VENV)/bin/bentoml serve service.service:Classifier --port $${PORT:-3000}

# The packages a bare GPU machine lacks, as wheels for bench/gpu_check.sh to install offline.
gpu-wheels: install
	$(PY) -m pip download -q --no-deps -d .whl open_clip_torch ftfy wcwidth

# flowers5 copied into an ignored folder, for `run --carry .gpu_data` (../shared does not travel).
gpu-data:
	mkdir -p .gpu_data && cp -r ../shared/data/flowers5 .gpu_data/

gpu-check:
	PYTHON=$${PYTHON:-python3} bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) artifacts

# The Bento's container image, built here and checked against `bentoml serve` on the same artifact (needs a Docker
# daemon; not part of `make test`): deploy/docker/check_container.py, docs/CONTAINER.md.  ARGS='--image orthserve:TAG'.
.PHONY: container
container: artifact
	$(PY) deploy/docker/check_container.py --artifact $(ARTIFACT) $(ARGS)
