"""The HTML merge report: self-contained (PNGs as data URIs), opened in headless Chromium with a screenshot
taken and every image checked to have loaded."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from lora_files import make_kohya

import loralego
from loralego.cli import main

pytest.importorskip("matplotlib", reason="the report draws its figures with matplotlib")

_IMG = re.compile(r"<img\b[^>]*>")
# Injected into a copy of the page (the report itself has no script): after load, write each image's
# natural width (-1 if it did not complete) into the DOM, which --dump-dom then prints.
_PROBE = """<script>
window.addEventListener("load", () => {
  const widths = Array.from(document.images).map((img) => (img.complete ? img.naturalWidth : -1));
  document.body.setAttribute("data-probe", widths.join(","));
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium); the browser check needs it")


def _run_chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        browser,
        "--headless",
        "--no-sandbox",  # tests may run as root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def _check_self_contained(html: str) -> list[str]:
    images = _IMG.findall(html)
    assert images and all('src="data:image/png;base64,' in img for img in images)
    assert not re.search(r"""(src|href)=["'](?!data:)""", html), "the page must not fetch anything"
    return images


def test_merge_report_is_self_contained_and_renders_in_chromium(mixed_adapters, tmp_path, capsys):
    out, report = tmp_path / "merged", tmp_path / "report.html"
    args = [
        "merge",
        *map(str, mixed_adapters),
        "--out",
        str(out),
        "--rank",
        "6",
        "--n-init",
        "2",
        "--report",
        str(report),
    ]
    assert main(args) == 0
    assert f"report: {report}" in capsys.readouterr().out
    html = report.read_text(encoding="utf-8")
    images = _check_self_contained(html)
    assert len(images) == 3  # metrics, one page of cluster heat maps (8 modules), norms
    assert "loralego merge " in html and "--report" in html and "merge (with report statistics)" in html
    assert html.count("model.layers.") >= 8

    browser = _chromium()
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    result = _run_chromium(
        browser, tmp_path / "profile-dom", "--virtual-time-budget=20000", "--dump-dom", probe.as_uri()
    )
    found = re.search(r'data-probe="([^"]*)"', result.stdout)
    assert found, f"the page's load event did not run in chromium (exit {result.returncode}): {result.stderr[-1500:]}"
    widths = [int(w) for w in found.group(1).split(",")]
    assert len(widths) == len(images) and all(w > 0 for w in widths), widths

    shot = tmp_path / "report.png"
    result = _run_chromium(
        browser, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri()
    )
    assert shot.exists(), f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-1500:]}"
    assert _png_size(shot) == (1280, 2000)
    assert shot.stat().st_size > 50_000  # a blank page compresses to a few kB; this one has figures on it


def test_report_of_an_existing_merge_reads_only_the_files(mixed_adapters, tmp_path, capsys):
    # Nothing is re-run (a tampered record cannot make it hang): figures at the recorded weights, no clusters.
    merged = tmp_path / "merged"
    loralego.merge_to_folder([loralego.load(p) for p in mixed_adapters], merged, rank=6, n_init=2, weights=[1, -0.5, 2])
    again = tmp_path / "again.html"
    assert main(["report", str(merged), *map(str, mixed_adapters), "--out", str(again)]) == 0
    html = again.read_text(encoding="utf-8")
    assert len(_check_self_contained(html)) == 2
    assert "merge --report` shows the clusters" in html
    figures = json.loads((tmp_path / "again.json").read_text())
    verify_json = tmp_path / "verify.json"
    assert main(["verify", str(merged), *map(str, mixed_adapters), "--json", str(verify_json)]) == 0
    assert figures == json.loads(verify_json.read_text())
    assert main(["report", str(merged), *map(str, mixed_adapters), "--out", str(again)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err


def test_report_of_kohya_merge_without_clusters(tmp_path):
    from loralego.report import report_existing

    inputs = [make_kohya(tmp_path / f"k{i}.safetensors", rank=4, alpha=1.0 + i, seed=i) for i in (1, 2)]
    out = tmp_path / "svd.safetensors"
    loralego.merge_to_folder([loralego.load(p) for p in inputs], out, method="svd", rank=3)
    page = report_existing(out, inputs, tmp_path / "svd.html", command="test")
    html = page.read_text(encoding="utf-8")
    assert len(_check_self_contained(html)) == 2  # no cluster heat maps for svd
    assert "does not cluster units" in html and "unet.down_blocks.0.resnets.0.conv1" in html  # canonical name


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("lego", []),
        ("lego+", []),  # weights 1 by default (lego+ sums): the report must use them, as the merge did
        ("svd", []),
        ("cat", []),
        ("task_arithmetic", ["--rank", "5"]),
        ("ties", ["--density", "0.5"]),
        ("dare_linear", []),
        ("dare_ties", []),
        ("magnitude_prune", []),
        ("linear", []),
        ("tsv", []),
        ("iso_c", []),
        ("iso_cts", []),
        ("knots_ties", []),
        ("knots_dare", []),
        ("ties", ["--space", "core"]),
        ("lego", ["--target", "vllm", "--weights", "1", "0.5"]),
        ("lego+", ["--weight-override", "1:v_proj=0.25"]),  # per-module weights, recorded and re-read
        ("cat", ["--weight-override", "2:q_proj=-1", "--verify"]),
    ],
)
def test_report_figures_equal_verify_json(method, extra, mixed_adapters, adapter_factory, tmp_path):
    inputs = [str(p) for p in mixed_adapters]
    if method == "linear":  # equal ranks only
        inputs = [str(adapter_factory(r=8, alpha=4, seed=s)) for s in (21, 22)]
    if "--weights" in extra:
        inputs = inputs[:2]
    out, report = tmp_path / "merged", tmp_path / "report.html"
    assert main(["merge", *inputs, "--out", str(out), "--method", method, "--report", str(report), "-q", *extra]) == 0
    figures = json.loads(report.with_suffix(".json").read_text())
    verify_json = tmp_path / "verify.json"
    assert main(["verify", str(out), *inputs, "--json", str(verify_json)]) == 0
    verified = json.loads(verify_json.read_text())
    assert figures["weights"] == verified["weights"]
    assert [m["module"] for m in figures["modules"]] == [m["module"] for m in verified["modules"]]
    for mine, theirs in zip([figures["total"], *figures["modules"]], [verified["total"], *verified["modules"]],
                            strict=True):
        assert mine.keys() == theirs.keys()
        for key, value in mine.items():
            if isinstance(value, float):
                assert value == pytest.approx(theirs[key], rel=1e-9, abs=1e-12), key
            else:
                assert value == theirs[key], key
    if method == "lego+" and not extra:
        assert figures["weights"] == [1.0] * len(inputs)
    if method == "cat" and extra:  # exact at the overridden weights: verify re-reads them from the merge's record
        assert verified["total"]["relative_error"] < 1e-6 and verified["weight_overrides"][1] == {"q_proj": -1.0}
