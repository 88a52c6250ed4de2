# Two commands for a newcomer (see README.md):
#   make book   set-up if needed, prepare the data, run every notebook, build the HTML
#   make test   the same set-up, then the tests
# and one to measure the spread over seeds (or any grid of _config.yml's sweeps:):
#   make sweep SWEEP=seeds [PROFILE=cpu]   each point a Ray task; then make book shows the spread
# and one to send the report:
#   make share  the built report as one zip archive that opens from disk, offline
PROFILE ?= cpu
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEBIAN_FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
RAW_FMNIST    := data/datasets/FashionMNIST/raw/train-images-idx3-ubyte
HTML    := book/_build/html
ARCHIVE := book/_build/tamperbench-report.zip

.PHONY: book test setup data browser notebooks html share clean-book sweep

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

# Debian packages, installed when we may (root, apt present) and they are missing: Fashion-MNIST,
# and Chromium with its driver for the browser test. Otherwise the loader falls back to
# data/datasets or a torchvision download, and the browser test is skipped with its reason.
APT_INSTALL = DEBIAN_FRONTEND=noninteractive apt-get install -y -qq
define apt_get
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's $(1)"; \
		$(APT_INSTALL) $(1) >/dev/null 2>&1 || { apt-get update -qq && $(APT_INSTALL) $(1) >/dev/null; } \
			|| echo "could not install Debian's $(1); going on without it (what needs it says so)"; \
	else echo "not root or no apt: skipping Debian's $(1)"; fi
endef

data: setup
	@if [ ! -f $(RAW_FMNIST) ] && [ ! -f $(DEBIAN_FMNIST) ]; then $(MAKE) --no-print-directory apt-fmnist; fi
	$(PY) -m tamperbench prepare-data

apt-fmnist:
	$(call apt_get,dataset-fashion-mnist)

browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then $(MAKE) --no-print-directory apt-browser; fi

apt-browser:
	$(call apt_get,chromium chromium-driver)

notebooks: data
	$(PY) -m tamperbench run --profile $(PROFILE)

# --all (inside): glued numbers are never stale; refuses a book with a failed or missing chapter
html:
	$(PY) -m tamperbench build

book: notebooks html
	@echo "The report: $(CURDIR)/$(HTML)/index.html  (make share: one zip to send)"

# The built site as one archive; unzipped anywhere, index.html opens from disk with no network.
share:
	@test -f $(HTML)/index.html || { echo "no report built yet: run make book first"; exit 1; }
	$(PY) -m tamperbench share $(HTML) $(ARCHIVE)

# a sweep never runs as part of make book; the reproduce chapter shows it once it has run
SWEEP ?= seeds
sweep: data
	$(PY) -m tamperbench sweep $(SWEEP) $(if $(filter command line,$(origin PROFILE)),--profile $(PROFILE))

test: data browser
	$(PY) -m pytest

clean-book:
	rm -rf book/_build
