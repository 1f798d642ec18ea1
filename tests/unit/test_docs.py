"""The documentation: the README fits a newcomer's five minutes and its links and
example hold; the docs site builds strictly (broken links fail); the spec
reference is what the spec's models say today."""
import re
import runpy
import subprocess
import sys

import yaml

from hvdtrain.spec import validate
from tests.conftest import ROOT, require_module

README = ROOT / "README.md"


def test_the_readme_fits_and_what_it_points_to_exists():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert "docs/spec.md" in links and "CONTRIBUTING.md" in links
    assert [link for link in links if not link.startswith("http") and not (ROOT / link).exists()] == []
    paths = set(re.findall(r"`((?:hvdtrain|examples|scripts|docs|benchmarks)/[\w./-]+)`", text))
    assert "hvdtrain/train/" in paths and [p for p in sorted(paths) if not (ROOT / p).exists()] == []


def test_the_readmes_example_spec_is_valid_and_is_the_example_file_in_short():
    text = README.read_text()
    block = text.split("The spec, in short", 1)[1].split("\n\n", 2)[1]
    short = yaml.safe_load("\n".join(line[4:] for line in block.splitlines()))
    whole = yaml.safe_load((ROOT / "examples" / "digits-cnn-torch.yaml").read_text())
    spec = validate(short)
    assert spec.model.kind == "cnn" and spec.data.source == "digits"
    for section, values in short.items():  # every value shown is the file's
        if isinstance(values, dict):
            assert {k: whole[section][k] for k in values} == values, section
        else:
            assert whole[section] == values


def test_the_spec_reference_is_generated_from_the_spec_today():
    reference = runpy.run_path(str(ROOT / "scripts" / "spec_reference.py"))["reference"]()
    assert "| `data.on_bad_file` | `fail` \\| `skip` | `fail` |" in reference  # a field, its type and default
    assert (ROOT / "docs" / "spec.md").read_text() == reference, \
        "docs/spec.md is stale: python scripts/spec_reference.py > docs/spec.md"


def test_every_page_is_in_the_sites_navigation_and_it_builds_strictly(tmp_path):
    require_module("mkdocs")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = {list(entry.values())[0] for entry in config["nav"]}
    assert listed == {p.name for p in (ROOT / "docs").glob("*.md")}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                             "-d", str(tmp_path / "site")], capture_output=True, text=True,
                            env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "spec" / "index.html").is_file()
    # and a broken link fails it
    broken = tmp_path / "docs"
    broken.mkdir()
    for page in (ROOT / "docs").glob("*.md"):
        (broken / page.name).write_text(page.read_text())
    (broken / "data.md").write_text((broken / "data.md").read_text() + "\n[gone](no-such-page.md)\n")
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump({**config, "docs_dir": str(broken)}))
    failed = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(tmp_path / "mkdocs.yml"),
                             "-d", str(tmp_path / "site2")], capture_output=True, text=True,
                            env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert failed.returncode != 0 and "no-such-page.md" in failed.stderr
