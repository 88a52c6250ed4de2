# Two commands for a newcomer (see README.md):
#   make book   set-up if needed, prepare the data, run every notebook, build the HTML
#   make test   the same set-up, then the tests
PROFILE ?= cpu
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEBIAN_FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
RAW_FMNIST    := data/datasets/FashionMNIST/raw/train-images-idx3-ubyte

.PHONY: book test setup data notebooks clean-book

setup: $(STAMP)

# Reinstalls only when pyproject.toml changes. torch and torchvision come first, pinned: pip
# takes these builds from the local disk, and PyPI's torchvision does not import beside other
# torch builds. Then the package with every dependency, and its Jupyter kernel for Papermill.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	$(PY) -m ipykernel install --sys-prefix --name tamperbench --display-name "Python (tamperbench)" >/dev/null
	touch $(STAMP)

# Fashion-MNIST from Debian's package when we may install it (root, apt present, data missing);
# otherwise the loader falls back to data/datasets or a torchvision download.
data: setup
	@if [ ! -f $(RAW_FMNIST) ] && [ ! -f $(DEBIAN_FMNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi
	$(PY) -m tamperbench prepare-data

notebooks: data
	$(PY) -m tamperbench run --profile $(PROFILE)

book: notebooks
	$(VENV)/bin/jupyter-book build book/
	@echo "The report: $(CURDIR)/book/_build/html/index.html"

test: data
	$(PY) -m pytest

clean-book:
	rm -rf book/_build
