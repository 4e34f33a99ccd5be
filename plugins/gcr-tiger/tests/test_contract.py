"""The one check every scheme author runs: gcr's conformance suite (gcr.testing.check_scheme) on TigerScheme."""

from __future__ import annotations

from gcr_tiger import TigerScheme

from gcr.testing import check_scheme


def test_tiger_keeps_the_scheme_contract(tmp_path):
    # cli=True would also run a tiny `gcr fit scheme=tiger` + `gcr eval` (gcr's own suite does that through
    # tests/test_plugin_package.py); here the in-process checks keep the plugin suite fast.
    report = check_scheme(TigerScheme, workdir=tmp_path, cli=False, levels=2, codebook_size=4)
    assert report["assign"].startswith("ok") and report["state"].startswith("ok")
