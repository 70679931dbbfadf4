"""The README and docs/ stay true to the tree: every repository path they cite exists, every
relative link (and its #anchor) resolves, every flag they show for an `attnkern` command is
one that command accepts, the API examples run, CI runs the README's test command, and the
README stays a front page (under 250 lines)."""

import contextlib
import glob
import importlib
import importlib.util
import io
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(["README.md", "benchmarks/README.md"]
               + [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))])
PATH_PREFIXES = ("attnkern/", "csrc/", "scripts/", "benchmarks/", "examples/", "docs/", "tests/",
                 "triton_kernels/", ".ci/")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def read(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def prose(text):
    """The text outside fenced code blocks (inline spans are looked for there)."""
    return FENCE.sub("", text)


def cited_paths(text):
    for span in SPAN.findall(prose(text)):
        for token in span.split():
            token = token.strip(",;:()[]")
            if token.startswith(PATH_PREFIXES):
                yield token


def exists(path):
    if "<" in path or path.endswith(".so") or "/_C" in path:
        return True  # a placeholder, or the extension a build leaves behind
    return bool(glob.glob(os.path.join(ROOT, path)))


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page):
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", prose(read(page)), re.M)}


@pytest.mark.parametrize("page", PAGES)
def test_cited_paths_exist(page):
    missing = sorted({p for p in cited_paths(read(page)) if not exists(p)})
    assert not missing, "%s cites paths that do not exist: %s" % (page, missing)


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    bad = []
    for target in LINK.findall(prose(read(page))):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else \
            os.path.join(ROOT, page)
        if not os.path.exists(full):
            bad.append(target)
        elif anchor and anchor not in anchors(os.path.relpath(full, ROOT)):
            bad.append(target)
    assert not bad, "%s links to missing files or anchors: %s" % (page, bad)


def test_no_spec_is_cited():
    # The project ships no SPEC file; the contract lives in docs/contract.md.
    cites = [page for page in PAGES if re.search(r"\bSPEC\b", read(page))]
    assert not cites


def test_readme_is_a_front_page():
    assert len(read("README.md").splitlines()) < 250


def _commands(text):
    """Every `attnkern ...` command line the text shows, inline or in a code block, without
    its trailing comment."""
    lines = [s for s in SPAN.findall(prose(text))]
    for block in FENCE.findall(text):
        lines += block.splitlines()[1:-1]
    for line in lines:
        line = line.split(" #")[0].strip()
        m = re.match(r"(?:python -m )?attnkern(\.tools\.[\w.]+)?(?:\s+(.*))?$", line)
        if m:
            yield m.group(1), m.group(2) or ""


def _help(module, argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        importlib.import_module(module).main(argv + ["--help"])
    return out.getvalue()


_COMMANDS = {"check": "attnkern.tools.check", "bench": "attnkern.tools.bench",
             "train": "attnkern.tools.train", "export": "attnkern.tools.export",
             "explain": "attnkern.tools.explain"}


def _help_for(module, rest):
    """The help text of the parser that reads this command line's flags."""
    if module:
        return _help("attnkern" + module, [])
    sub = rest.split()[0] if rest.split() else ""
    assert sub in _COMMANDS, "attnkern has no command %r" % sub
    if sub == "bench":
        fam = re.search(r"--family[ =](\w+)|--op[ =](\w+)", rest)
        family = (fam.group(1) or {"activation_unit_pool": "activation"}.get(fam.group(2), "op")) \
            if fam else "op"
        if family in ("activation", "serving"):
            return _help("attnkern.tools.bench", ["--family", family]) + " --family"
        return _help(_COMMANDS[sub], []) + " --op"  # the older spelling, left out of --help
    return _help(_COMMANDS[sub], [])


@pytest.mark.parametrize("page", PAGES)
def test_command_flags_exist(page):
    bad = []
    for module, rest in _commands(read(page)):
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest))
        if not flags:
            continue
        text = _help_for(module, rest)
        bad += ["%s: %s" % (rest, f) for f in sorted(flags)
                if not re.search(re.escape(f) + r"(?![\w-])", text)]
    assert not bad, "%s shows flags the commands do not accept: %s" % (page, bad)


@pytest.mark.parametrize("page", ["README.md", "docs/api.md", "docs/layers.md", "docs/torchrec.md"])
def test_python_examples_run(page):
    """The pages' examples run as shown, block after block in one namespace (a block that
    starts with a class name is a signature listing, not code)."""
    namespace = {}
    for block in re.findall(r"^```python\n(.*?)^```", read(page), re.S | re.M):
        if "from torchrec" in block and importlib.util.find_spec("torchrec") is None:
            continue  # an optional extra (scripts/install_torchrec.sh); tests/test_torchrec.py runs it
        if not re.match(r"[A-Z]\w*\(", block):
            exec(compile(block, page, "exec"), namespace)


def test_ci_runs_the_readme_test_command():
    """.ci/run's comment calls its command the README's: the README's test command (what follows
    the venv set-up) must be in .ci/run, line for line."""
    readme = read("README.md")
    block = next(b for b in FENCE.findall(readme) if "python -m pytest -q" in b)
    command = " ".join(block.splitlines()[1:-1])
    command = " ".join(command.split(". .venv/bin/activate &&", 1)[1].split())
    ci = " ".join(read(".ci/run").split())
    assert command in ci
