import zipfile

import pytest

from tamperbench import share
from tamperbench.__main__ import main


def _site(root, extra=""):
    (root / "_static").mkdir(parents=True)
    (root / "index.html").write_text(f"<html><head><script src='_static/app.js'></script>{extra}</head>"
                                     "<body><a href='https://example.org/paper'>a paper</a></body></html>")
    (root / "_static" / "app.js").write_text("console.log(1)")
    (root / "_static" / "style.css").write_text("body { color: black }")
    return root


def test_archive_holds_every_file_under_one_folder(tmp_path):
    site = _site(tmp_path / "html")
    out = share.make_archive(site, tmp_path / "report.zip")
    names = zipfile.ZipFile(out).namelist()
    assert sorted(names) == ["tamperbench-report/_static/app.js", "tamperbench-report/_static/style.css",
                             "tamperbench-report/index.html"]


@pytest.mark.parametrize("asset", [
    "<script src='https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js'></script>",
    "<link rel='stylesheet' href='//fonts.googleapis.com/css?family=Lato'>",
])
def test_a_report_that_needs_the_network_is_refused(tmp_path, asset):
    site = _site(tmp_path / "html", asset)
    with pytest.raises(share.ShareError, match="from the network"):
        share.make_archive(site, tmp_path / "report.zip")
    assert not list(tmp_path.glob("*.zip")) and not list(tmp_path.glob(".*tmp*"))  # nothing half-written


def test_a_missing_report_is_one_clear_error(tmp_path, capsys):
    assert main(["share", str(tmp_path / "nowhere"), str(tmp_path / "r.zip")]) == 2
    assert "make book" in capsys.readouterr().err
