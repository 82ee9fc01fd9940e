"""The operator documentation cannot drift from the code: configuration.md documents every key of
the settings model with its real type, default and environment variable and a TOML example
that parses; runbook.md has a section for every alert with the parts an operator needs; every
relative link in docs/ and README.md leads to a file that exists."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from settings_keys import default_text, env_name, settings_keys, type_text

from edge_agent.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
KEYS = dict(settings_keys(Settings))

# The alert names of the Prometheus rules; the rules' runbook_url points at these anchors.
ALERTS = ["EdgeAgentBacklogGrowing", "EdgeAgentOldestUnconfirmedTooOld", "EdgeAgentBufferAboveWatermark",
          "EdgeAgentLakeUnreachable", "EdgeAgentQuarantinedFiles", "EdgeAgentDown", "EdgeAgentAttention",
          "EdgeAgentFleetAgentSilent", "EdgeAgentNoDataWhileExpected", "EdgeAgentDataOutsideExpectedTime",
          "EdgeAgentInputRateLow", "EdgeAgentNightOverdue"]
RUNBOOK_PARTS = ["**What it means**", "**Check**", "**Do**", "**Never**"]


def sections(text: str, level: str) -> dict[str, str]:
    """Heading text -> body, for headings of exactly this level ('##' or '###')."""
    parts = re.split(rf"(?m)^{level} (.+)$", text)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def documented_keys() -> dict[str, str]:
    out = {}
    for heading, body in sections((DOCS / "configuration.md").read_text(), "###").items():
        m = re.fullmatch(r"`([^`]+)`", heading)
        assert m, f"configuration.md: a ### heading is not a key: {heading!r}"
        assert m.group(1) not in out, f"{m.group(1)} is documented twice"
        out[m.group(1)] = body.split("\n## ", 1)[0]
    return out


def test_model_walk_sees_nested_tables() -> None:
    """The control for the test below: the walk reaches every kind of nesting."""
    assert len(KEYS) > 80
    for key in ("state_dir", "retry.jitter", "lake.rucio.auth.token_file", "destinations.NAME.require_file",
                "rules.NAME.copies", "windows[].bandwidth_mbps"):
        assert key in KEYS


def test_configuration_documents_every_key_and_nothing_else() -> None:
    documented = documented_keys()
    missing = sorted(set(KEYS) - set(documented))
    unknown = sorted(set(documented) - set(KEYS))
    assert not missing, f"keys of the settings model missing from docs/configuration.md: {missing}"
    assert not unknown, f"docs/configuration.md documents keys the model does not have: {unknown}"


@pytest.mark.parametrize("key", sorted(KEYS))
def test_key_facts_match_the_model(key: str) -> None:
    body = documented_keys().get(key)
    if body is None:
        pytest.fail(f"{key} is not documented")
    field = KEYS[key]
    facts = f"{type_text(field)} · default: `{default_text(field)}` · env: `{env_name(key)}`"
    assert facts in body, f"docs/configuration.md, {key}: expected the line\n  {facts}"
    meaning = body.split(facts, 1)[1].split("```", 1)[0].strip()
    assert len(meaning) > 15, f"{key}: no explanation"


@pytest.mark.parametrize("key", sorted(KEYS))
def test_key_example_is_valid_toml_that_sets_it(key: str) -> None:
    body = documented_keys()[key]
    m = re.search(r"```(toml|sh)\n(.*?)```", body, re.DOTALL)
    assert m, f"{key}: no example"
    leaf = key.rsplit(".", 1)[-1]
    if m.group(1) == "sh":   # secrets: shown as their environment variable only
        assert m.group(2).startswith(env_name(key) + "="), f"{key}: {m.group(2)!r}"
        assert KEYS[key].annotation is not None and "Secret" in str(KEYS[key].annotation)
        return
    doc = tomllib.loads(m.group(2))
    if key.startswith("windows[].") and "windows" in doc:
        doc = doc["windows"][0]
    assert leaf in doc, f"{key}: the example does not set {leaf}: {m.group(2)!r}"


def test_runbook_has_every_alert_with_its_parts() -> None:
    text = (DOCS / "runbook.md").read_text()
    found = sections(text, "##")
    for alert in ALERTS:
        assert alert in found, f"docs/runbook.md has no '## {alert}'"
        body = found[alert]
        for part in RUNBOOK_PARTS:
            assert part in body, f"docs/runbook.md, {alert}: no {part} part"
    # the anchor a runbook_url uses is the heading's GitHub slug: the alert name in lower case
    headings = re.findall(r"(?m)^## (EdgeAgent\w+)\s*$", text)
    assert sorted(headings) == sorted(ALERTS), "one section per alert, nothing else named like one"


def test_runbook_says_what_never_to_do_to_the_buffer() -> None:
    never = (DOCS / "runbook.md").read_text()
    for must in ("rm", "ledger", "move", "edge-agent retry"):
        assert must in never


def markdown_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")) + ["../README.md"])
def test_relative_links_resolve(page: str) -> None:
    path = (DOCS / page).resolve()
    broken = []
    for link in markdown_links(path):
        if re.match(r"^[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        dest = (path.parent / target).resolve() if target else path
        if not dest.exists():
            broken.append(link)
        elif anchor and dest.suffix == ".md":
            slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
                     for h in re.findall(r"(?m)^#+ (.+)$", dest.read_text())}
            if anchor.lower() not in slugs:
                broken.append(link)
    assert not broken, f"{page}: broken links {broken}"


def test_docs_index_lists_every_page() -> None:
    index = (DOCS / "README.md").read_text()
    for page in DOCS.glob("*.md"):
        if page.name != "README.md":
            assert f"({page.name})" in index, f"docs/README.md does not link {page.name}"
