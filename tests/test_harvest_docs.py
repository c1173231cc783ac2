"""What an operator needs to run a harvest from the docs alone: how to review held labels, what to commit, that the
photos need `dvc push`, and a retrain workflow that keeps people's review decisions between runs."""

from __future__ import annotations

import re

import yaml

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def recipe() -> str:
    """The README's harvest recipe: its first bash block after "From nothing to a first harvest"."""
    section = README[README.index("### From nothing to a first harvest") :]
    return re.search(r"```bash\n(.*?)```", section, re.DOTALL)[1]


def test_the_harvest_recipe_commits_its_four_files_by_name_and_pushes_the_photos():
    lines = recipe().splitlines()
    harvest = next(line for line in lines if line.startswith("make harvest"))
    assert "API_KEYS_FILE=" in harvest  # harvest trusts a key only while the keys file holds it valid
    commit = next(line for line in lines if line.startswith("git commit"))
    files = ["data/feedback.dvc", "data/.gitignore", "reports/harvest.json", "reports/harvest-review.csv"]
    assert commit.split(" -- ")[1].split() == files  # only these, whatever the training run left modified
    assert any(re.match(r"(\.venv/bin/)?dvc push", line) for line in lines[lines.index(commit) :])


def test_the_readme_says_how_to_review_held_labels():
    section = README[README.index("**Reviewing held labels.**") :].split("\n## ")[0]
    for needed in ("reports/harvest-review.csv", "`photo` column", "`confirmed_label`", "`none`",
                   "REVIEWED=reports/harvest-review.csv"):  # fmt: skip
        assert needed in section, needed


def test_the_retrain_workflow_commits_the_review_file_and_gives_harvest_the_keys():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "retrain.yml").read_text())
    assert "API_KEYS_FILE" in workflow["env"]
    steps = {step.get("name", ""): step for step in workflow["jobs"]["retrain"]["steps"]}
    propose = next(step for name, step in steps.items() if name.startswith("Propose"))
    added = " ".join(line for line in propose["run"].splitlines() if line.strip().startswith("git add"))
    assert "reports/harvest-review.csv" in added and "data/feedback.dvc" in added
    assert "review_changed" in propose["if"]  # decisions alone, with no new photo, are committed too
