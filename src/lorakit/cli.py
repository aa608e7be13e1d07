"""The ``lorakit`` command line: each verb calls one library function, prints, and maps errors to exit codes.

Exit codes: 0 success; 1 a clean refusal (a :class:`LorakitError`: bad file, bad option value), one line on stderr;
2 a usage error (typer's own); 3 an internal error (any other exception, a lorakit bug): one line naming the
exception type, its message and the command's file arguments. The global ``--debug`` option prints the traceback
instead of the one line (same exit codes).
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from lorakit.errors import LorakitError
from lorakit.formats import native
from lorakit.formats.safetensors_io import sha256_file

#: Exit code of a clean refusal and of an internal error (2 is typer's usage error).
EXIT_REFUSED, EXIT_INTERNAL = 1, 3


def _one_line(text: str) -> str:
    """``text`` on one line, printable whatever it holds (lone surrogates from a hostile file included)."""
    line = "; ".join(part.strip(" -") for part in text.splitlines() if part.strip(" -"))
    return line.encode("utf-8", "backslashreplace").decode("utf-8")


def _file_args(group: TyperGroup, ctx: typer.Context, argv: list[str]) -> list[str]:
    """The path arguments and options in the command line ``argv`` (re-parsed without side effects)."""
    try:
        at = next(i for i, a in enumerate(argv) if a in group.commands)
        cmd = group.commands[argv[at]]
        sub = cmd.make_context(argv[at], argv[at + 1:], parent=ctx, resilient_parsing=True)
    except Exception:  # noqa: BLE001 - a best-effort hint for the message, never a second error
        return []
    found = []
    for value in sub.params.values():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, Path):
                found.append(str(v))
    return found


class _Guarded(TyperGroup):
    """The app's command group: whatever a command raises ends as one line on stderr and an exit code.

    A :class:`LorakitError` is a clean refusal (exit 1). Any other exception is a lorakit bug: one line with its
    type, message and the file arguments (exit 3), or the traceback with ``--debug``. Usage errors stay typer's.
    """

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        ctx.meta["lorakit.argv"] = list(args)  # for naming the files in an internal error
        return super().parse_args(ctx, args)

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - the last resort is the point
            refused = isinstance(e, LorakitError)
            if ctx.params.get("debug"):
                err.print(Text("".join(traceback.format_exception(e))), highlight=False, soft_wrap=True)
            elif refused:
                err.print(Text("error: ", style="red") + Text(_one_line(str(e))), highlight=False, soft_wrap=True)
            else:
                files = _file_args(self, ctx, ctx.meta.get("lorakit.argv", []))
                where = f" (file(s): {', '.join(files)})" if files else ""
                err.print(Text("internal error: ", style="red") + Text(_one_line(
                    f"{type(e).__name__}: {e}{where}; rerun with --debug for the traceback")),
                    highlight=False, soft_wrap=True)
            ctx.exit(EXIT_REFUSED if refused else EXIT_INTERNAL)


app = typer.Typer(cls=_Guarded, add_completion=False, no_args_is_help=True,
                  help="LoRA adapters as data: inspect, train, convert, split and compose adapters.")
out = Console()
err = Console(stderr=True)


@app.callback()
def root(debug: bool = typer.Option(False, "--debug", help="print the traceback of an error instead of one line")
         ) -> None:
    """LoRA adapters as data: inspect, train, convert, split and compose adapters."""


def describe(path: Path) -> dict:
    """A JSON-ready summary of an adapter file: header fields and per-module rank, alpha, params, bytes, ‖ΔW‖."""
    from lorakit.formats import kohya_metadata
    from lorakit.formats.detect import detect, read_any, tensor_file

    dialect = detect(path)
    adapter = read_any(path)
    modules = [{"module": p, "kind": m.kind, "rank": m.rank, "alpha": m.alpha, "scale": m.scale,
                "shape": list(m.weight_shape), "params": m.numel, "bytes": m.nbytes, "dora": m.magnitude is not None,
                "delta_norm": m.delta_norm()}
               for p, m in adapter.modules.items()]
    fmt = f"{native.FORMAT} v{native.VERSION}" if dialect == "native" else dialect
    return {"file": str(path), "format": fmt, "dialect": dialect, "sha256": sha256_file(tensor_file(path)),
            "base_model": adapter.base_model, "targets": list(adapter.targets), "modules": modules,
            "num_modules": len(adapter), "total_rank": adapter.total_rank, "params": adapter.num_params,
            "bytes": adapter.nbytes, "dtype": str(adapter.dtype).removeprefix("torch."),
            "overrides": {k: list(t.shape) for k, t in adapter.overrides.items()}, "metadata": dict(adapter.metadata),
            "training": kohya_metadata.summary(adapter.metadata, path)}


@app.command()
def inspect(file: Path = typer.Argument(..., help="adapter file (.safetensors, any dialect) or PEFT directory"),
            as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
            plot: Path | None = typer.Option(None, "--plot", help="write a PNG heatmap of energy per block"),
            family: str | None = typer.Option(None, help="block family for --plot (default: detected)")) -> None:
    """Show an adapter's modules, ranks, alphas, sizes and per-module update norms."""
    info = describe(file)
    if plot is not None:
        from lorakit.formats.detect import read_any
        from lorakit.ops import plot_block_energy

        plot_block_energy(read_any(file), plot, family=family, title=file.name)
        err.print(f"energy heatmap -> {plot}")
    if as_json:
        print(json.dumps(info, indent=2))
        return
    out.print(f"[bold]{info['file']}[/bold]  {info['format']}  base: {info['base_model'] or '-'}")
    table = Table("kind", "rank", "alpha", "shape", "params", "bytes", "‖ΔW‖")
    table.add_column("module", overflow="fold")
    for m in info["modules"]:
        table.add_row(m["kind"] + (" +DoRA" if m["dora"] else ""), str(m["rank"]), f"{m['alpha']:g}",
                      "×".join(map(str, m["shape"])), f"{m['params']:,}", f"{m['bytes']:,}",
                      f"{m['delta_norm']:.4g}", m["module"])
    out.print(table)
    out.print(f"{info['num_modules']} modules, total rank {info['total_rank']}, {info['params']:,} parameters, "
              f"{info['bytes']:,} bytes, dtype {info['dtype']}")
    if info["overrides"]:
        out.print(f"full tensors: {', '.join(info['overrides'])}")
    if info["training"]:  # kohya's ss_* training facts
        out.print("training: " + ", ".join(f"{k} {json.dumps(v, ensure_ascii=False)}"
                                          for k, v in info["training"].items()))


def _quiet_transformers() -> None:
    """Keep transformers' load reports (e.g. the fresh classifier head) out of the training output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@app.command()
def train(config: Path | None = typer.Argument(None, help="training config (.yaml), see configs/"),
          overrides: list[str] = typer.Option([], "--set", help="override a field: --set optim.lr=5e-4"),
          resume: Path | None = typer.Option(None, "--resume", help="continue the run in this directory"),
          threads: int = typer.Option(2, "--threads", help="torch CPU threads")) -> None:
    """Fine-tune a model with LoRA as CONFIG describes; print the figures and where the results went."""
    import torch

    from lorakit.train import load_config
    from lorakit.train import train as run_training
    from lorakit.train.config import ConfigError
    from lorakit.train.progress import RichReporter

    if threads < 1:  # torch.set_num_threads(0) raises a bare RuntimeError
        raise ConfigError(f"option '--threads': expected an int >= 1, got {threads}")
    torch.set_num_threads(threads)
    _quiet_transformers()
    if resume is not None:
        cfg = load_config(resume / "config.yaml", [*overrides, f"run.out_dir={resume}"])
    elif config is None:
        raise typer.BadParameter("give a CONFIG file, or --resume RUN_DIR")
    else:
        cfg = load_config(config, overrides)
    result = run_training(cfg, resume=resume is not None, reporter=RichReporter(out))
    if torch.distributed.is_initialized():  # under torchrun: only rank 0 reports
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
        if rank != 0:
            return
    m = result.metric
    if result.base_metrics is not None:
        out.print(f"{m} before training: {result.base_metrics[m]:.4f}")
    best = result.best_metrics
    out.print(f"{m} after training:  {result.final_metrics[m]:.4f}   (best {best.get(m, float('nan')):.4f} "
              f"at step {best.get('step', '-')})")
    if "target_accuracy" in result.final_metrics:  # reported only; never used to pick the best adapter
        before = f"{result.base_metrics['target_accuracy']:.4f} → " if result.base_metrics else ""
        out.print(f"target_accuracy (held-out target domain): {before}{result.final_metrics['target_accuracy']:.4f}")
    out.print(f"trainable parameters: {result.trainable_params:,} of {result.total_params:,} "
              f"({100 * result.trainable_params / max(result.total_params, 1):.2f}%)")
    out.print(f"{result.steps} steps in {result.seconds:.0f} s")
    if result.adapter_last is not None:
        out.print(f"adapter: {result.adapter_best} (best), {result.adapter_last} (last)", soft_wrap=True)
    if result.model_last is not None:
        out.print(f"model:   {result.model_best} (best), {result.model_last} (last)", soft_wrap=True)
    out.print(f"plot:    {result.plot}   metrics: {result.run_dir / 'metrics.jsonl'}", soft_wrap=True)
    if result.samples:
        out.print(f"samples: {result.run_dir / 'samples'} ({len(result.samples)} files)", soft_wrap=True)


@app.command("eval")
def eval_(run_dir: Path = typer.Argument(..., help="a training run directory"),
          which: str = typer.Option("best", help="which adapter: best or last")) -> None:
    """Evaluate a run's saved adapter on its task's evaluation set."""
    from lorakit.train import evaluate_run

    _quiet_transformers()
    for k, v in evaluate_run(run_dir, which).items():
        out.print(f"{k}: {v:.4f}")


@app.command()
def predict(text: list[str] = typer.Argument(..., help="one or more sentences"),
            run_dir: Path = typer.Option(Path("runs/sst2-minilm"), "--run", help="a text-classification run"),
            which: str = typer.Option("best", help="which adapter: best or last")) -> None:
    """Classify sentences with a run's saved adapter (SST-2: 0 negative, 1 positive)."""
    from lorakit.train import predict as run_predict

    _quiet_transformers()
    names = {0: "negative", 1: "positive"}
    for sentence, label in zip(text, run_predict(run_dir, list(text), which)):
        out.print(f"{label} ({names.get(label, label)})  {sentence}")


@app.command()
def generate(run_dir: Path = typer.Argument(..., help="a finished diffusion training run"),
             prompt: str = typer.Argument(..., help="the prompt"),
             out_file: Path = typer.Option(..., "--out", help="PNG file to write"),
             negative: str = typer.Option("", "--negative", help="negative prompt"),
             steps: int | None = typer.Option(None, help="denoising steps (default: the run's sample_steps)"),
             guidance: float | None = typer.Option(None, help="guidance scale (default: the run's sample_guidance)"),
             seed: int = typer.Option(0, help="seed of the initial noise"),
             width: int | None = typer.Option(None, help="pixels, a multiple of 8 (default: the run's resolution)"),
             height: int | None = typer.Option(None, help="pixels, a multiple of 8 (default: the run's resolution)"),
             strength: float = typer.Option(1.0, help="adapter strength (0: the base model)"),
             blocks: str | None = typer.Option(None, help="block weights: an LBW string or preset (OUTALL, ...)"),
             which: str = typer.Option("best", "--adapter", help="which adapter: best or last"),
             sampler: str | None = typer.Option(None, help="sampler: auto, ddim, euler, euler_a, ... (default: "
                                                           "the run's sample_sampler)")) -> None:
    """Render one image with a diffusion run's adapter, at a strength and per-block weights."""
    from lorakit.train.sampling import generate as render_image

    _quiet_transformers()
    path = render_image(run_dir, prompt, out_file, negative=negative, steps=steps, guidance=guidance, seed=seed,
                        width=width, height=height, strength=strength, blocks=blocks, which=which, sampler=sampler)
    out.print(f"{run_dir} ({which} adapter, strength {strength:g}{', blocks ' + blocks if blocks else ''}) -> "
              f"{path}", soft_wrap=True)


@app.command()
def convert(src: Path = typer.Argument(..., help="adapter to read (any dialect; a PEFT directory too)"),
            dst: Path = typer.Argument(..., help="where to write (a directory for --to peft)"),
            to: str = typer.Option(..., "--to", help="target dialect: native, peft, kohya or diffusers"),
            lossy: bool = typer.Option(False, "--lossy", help="drop what the target cannot hold, with a warning"),
            root: str | None = typer.Option(None, "--root", help="pipeline component of bare module paths "
                                                                 "(unet, text_encoder, text_encoder_2)"),
            sgm: str | None = typer.Option(None, "--sgm", help="kohya: SGM/LDM UNet names for sd15 or sdxl")) -> None:
    """Convert an adapter between dialects; alphas and ranks are carried exactly, losses are errors."""
    import warnings

    from lorakit.formats.detect import DIALECTS, detect, read_any, write

    if to not in DIALECTS:
        raise typer.BadParameter(f"--to must be one of {', '.join(DIALECTS)}")
    source = detect(src)
    adapter = read_any(src, root=root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write(adapter, dst, to, lossy=lossy, root=root, sgm=sgm)
    for w in caught:
        err.print(f"[yellow]warning:[/yellow] {w.message}", highlight=False, soft_wrap=True)
    out.print(f"{src} ({source}) -> {dst} ({to}): {len(adapter)} modules, {adapter.num_params:,} parameters")


def _floats(text: str | None) -> list[float] | None:
    try:
        return None if text is None else [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def _pairs(items: list[str], number: bool = False) -> dict:
    """``["a=1", "b=2"]`` → ``{"a": "1", "b": "2"}`` (values as floats with ``number``)."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise typer.BadParameter(f"expected NAME=VALUE, got {item!r}")
        try:
            out[key.strip()] = float(value) if number else value
        except ValueError:
            raise typer.BadParameter(f"{item!r}: {value!r} is not a number") from None
    return out


@app.command()
def split(file: Path = typer.Argument(..., help="adapter to split (any dialect)"),
          out_dir: Path = typer.Option(..., "--out", help="package folder for the parts and split.json"),
          by: str = typer.Option("block", "--by", help="component, block, type, selector, size or rank"),
          family: str | None = typer.Option(None, help="block family: sd15, sdxl, blora, bert, gpt2, llama"),
          bands: str | None = typer.Option(None, help="rank band widths, e.g. 4,4,8"),
          energy: str | None = typer.Option(None, help="cumulative energy cuts for rank bands, e.g. 0.5,0.9"),
          max_bytes: int | None = typer.Option(None, "--max-bytes", help="shard budget for --by size"),
          select: list[str] = typer.Option([], help="NAME=SELECTOR for --by selector, e.g. attn='attn1,attn2'"),
          weight: list[str] = typer.Option([], help="NAME=W: a part's default weight, e.g. band1=0.5")) -> None:
    """Split an adapter into standalone part files plus a split.json manifest."""
    from lorakit.formats.detect import read_any, tensor_file
    from lorakit.ops import save_split
    from lorakit.ops import split as split_adapter

    selectors = _pairs(select) or None
    try:
        ints = None if bands is None else [int(b) for b in bands.split(",")]
    except ValueError:
        raise typer.BadParameter(f"--bands: expected comma-separated integers, got {bands!r}") from None
    result = split_adapter(read_any(file), by, family=family, selectors=selectors, bands=ints,
                           energy=_floats(energy), max_bytes=max_bytes, sha256=sha256_file(tensor_file(file)),
                           default_weights=_pairs(weight, number=True))
    manifest = save_split(result, out_dir)
    for p in manifest["parts"]:
        out.print(f"{p['name']:>10}  {len(p['modules']):4d} modules  {p['bytes']:>10,} bytes  "
                  f"energy {p['energy']:.3f}  {p['file']}")
    out.print(f"{file} -> {out_dir} ({by}, {result.recombine}, {len(result.parts)} parts)")


@app.command()
def join(package: Path = typer.Argument(..., help="split package folder (or its split.json)"),
         out_file: Path = typer.Option(..., "--out", help="adapter file to write"),
         part: list[str] = typer.Option([], help="join only these parts"),
         tag: list[str] = typer.Option([], help="join only parts with these tags"),
         weights: str | None = typer.Option(None, help="an LBW string, or NAME=W,NAME=W per part")) -> None:
    """Recombine parts of a split package (all, or chosen ones), optionally weighted; hashes are checked."""
    from lorakit.ops import load_split, recombine

    s = load_split(package, part or None, tag or None)
    w: dict[str, float] | str = {}
    if weights and "=" in weights:
        w = _pairs(weights.split(","), number=True)
    elif weights:
        w = weights
    adapter = recombine(s, w, partial=bool(part or tag))
    native.save(adapter, out_file)
    out.print(f"{package} -> {out_file}: {len(s.parts)} parts, {len(adapter)} modules")


@app.command()
def compose(files: list[Path] = typer.Argument(..., help="adapters to compose"),
            out_file: Path = typer.Option(..., "--out", help="adapter file to write"),
            weights: str | None = typer.Option(None, help="one weight per adapter, e.g. 1,0.5"),
            method: str = typer.Option("concat", help="concat (exact), svd, ties or dare"),
            rank: int | None = typer.Option(None, help="target rank for svd / ties / dare"),
            density: float = typer.Option(0.5, help="share of entries kept by ties / dare"),
            seed: int = typer.Option(0, help="DARE drop-mask seed")) -> None:
    """Compose several adapters with weights into one (never by summing factors)."""
    from lorakit.formats.detect import read_any
    from lorakit.ops import compose as compose_adapters

    adapter, report = compose_adapters([read_any(f) for f in files], _floats(weights), method=method, rank=rank,
                                       density=density, seed=seed)
    native.save(adapter, out_file)
    lossy = {p: e for p, e in report.retained_energy.items() if e < 1.0}
    out.print(f"{len(files)} adapters -> {out_file} ({method}): {len(adapter)} modules, total rank "
              f"{adapter.total_rank}" + (f", min retained energy {min(lossy.values()):.4f}" if lossy else ", exact"))


@app.command()
def resize(file: Path = typer.Argument(..., help="adapter to resize"),
           out_file: Path = typer.Option(..., "--out", help="adapter file to write"),
           rank: int | None = typer.Option(None, help="fixed rank"),
           sv_ratio: float | None = typer.Option(None, "--sv-ratio", help="keep σ ≥ σ_max / ratio"),
           fro: float | None = typer.Option(None, help="keep this share of the Frobenius norm"),
           cumulative: float | None = typer.Option(None, help="keep this share of Σσ"),
           max_rank: int | None = typer.Option(None, "--max-rank", help="cap for the dynamic rules")) -> None:
    """Truncate every module to a fixed or dynamic rank (optimal, from the factors); reports what is lost."""
    from lorakit.formats.detect import read_any
    from lorakit.ops import resize as resize_adapter

    adapter, report = resize_adapter(read_any(file), rank=rank, sv_ratio=sv_ratio, fro=fro, cumulative=cumulative,
                                     max_rank=max_rank)
    native.save(adapter, out_file)
    worst = min(report.retained_energy.values(), default=1.0)
    out.print(f"{file} -> {out_file}: total rank {sum(r for r, _ in report.ranks.values())} -> {adapter.total_rank}, "
              f"min retained energy {worst:.4f}")


@app.command()
def extract(base: Path = typer.Argument(..., help="base model weights (.safetensors)"),
            tuned: Path = typer.Argument(..., help="fine-tuned model weights (.safetensors)"),
            out_file: Path = typer.Option(..., "--out", help="adapter file to write"),
            rank: int | None = typer.Option(None, help="target rank"),
            energy: float | None = typer.Option(None, help="or: smallest rank holding this energy share"),
            max_rank: int = typer.Option(128, "--max-rank", help="cap for --energy")) -> None:
    """Extract a LoRA from two models by randomized SVD of each changed weight (2-D linear, 3/4-D conv)."""
    from lorakit.formats.safetensors_io import read_safetensors
    from lorakit.ops import extract as extract_adapter
    from lorakit.ops.svd import kinds_from_shapes

    b, _ = read_safetensors(base)
    t, _ = read_safetensors(tuned)
    adapter, kept = extract_adapter(b, t, kinds_from_shapes(b), rank=rank, energy=energy, max_rank=max_rank,
                                    base_model=str(base))
    native.save(adapter, out_file)
    out.print(f"{len(adapter)} modules extracted -> {out_file}, total rank {adapter.total_rank}, min captured "
              f"energy {min(kept.values()):.4f}")


@app.command()
def merge(base: Path = typer.Argument(..., help="base model weights (.safetensors)"),
          adapter_file: Path = typer.Argument(..., help="adapter to bake in"),
          out_file: Path = typer.Option(..., "--out", help="merged model weights to write"),
          strength: float = typer.Option(1.0, help="multiplier of the update"),
          prefix: str = typer.Option("", help="prefix of the adapter's module paths in the state dict")) -> None:
    """Bake an adapter into base weights and save the merged model as safetensors."""
    from lorakit.formats.detect import read_any
    from lorakit.formats.safetensors_io import read_safetensors
    from lorakit.ops import save_merged

    state, meta = read_safetensors(base)
    adapter = read_any(adapter_file)
    save_merged(state, adapter, out_file, strength=strength, prefix=prefix, metadata=meta)
    out.print(f"{adapter_file} merged into {base} -> {out_file} ({len(adapter)} modules, strength {strength:g})")


def main() -> None:
    """Entry point: run the app; its command group maps every error to one line and an exit code (see above)."""
    app()


if __name__ == "__main__":
    main()
