"""An implementation outside PyTorch, end to end through the dump format: impl's MMDiT exported to ONNX with its
intermediate outputs (the image tokens, c, the embedded context, every joint block's two streams, the final layer
and the output) as graph outputs, run in ONNX Runtime on the model inputs an ``sd3parity dump`` recorded, and
written as a dump of its own::

    sd3parity dump --family sd3.5-medium --prompt "a cat" --out impl.dump
    python -m parity.onnx_mmdit impl.dump ort.dump
    sd3parity compare-dumps ort.dump impl.dump --max-abs 1e-4

Each transformer call of the input dump (every step's ``cond`` and ``uncond`` branch; skip-layer calls are left
out) is run by ONNX Runtime on that call's recorded inputs, so each call is compared on its own inputs and the
records within a call propagate ONNX Runtime's own results. The weights are those the input dump's run read
(its settings name the model), loaded by impl. Needs ``onnx`` and ``onnxruntime``; float32 runs only.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from parity import dump as D
from parity import records as R

INPUTS = ("latent_in", "timestep", "pooled", "context")


def _names(depth: int) -> list[str]:
    out = ["tokens", "c", "context_embedder"]
    for i in range(depth):
        out += [f"block.{i}.x"] + ([f"block.{i}.context"] if i < depth - 1 else [])
    return out + ["final", "output"]


def _graph(mmdit):
    """impl's MMDiT as a module returning every record of ``_names`` in that order."""
    import torch

    class Outputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = mmdit

        def forward(self, x, t, y, context):
            m = self.m
            tokens, c, ctx = m.embed(x, t, y, context)
            out = [tokens, c, ctx]
            for block in m.joint_blocks:
                ctx, tokens = block(ctx, tokens, c, m.options)
                out += [tokens] + ([ctx] if ctx is not None else [])
            final = m.final_layer(tokens, c, m.options.casts == "cast_back")
            return tuple(out + [final, m.unpatchify(final, x.shape[2], x.shape[3])])
    return Outputs().eval()


def run(input_dump: Path, out: Path, threads: int = 1) -> int:
    """Write the ONNX Runtime dump of every model call of ``input_dump``; returns the number of records."""
    import warnings

    import onnxruntime as ort
    import torch

    from parity.golden import spec_of
    from parity.run import resolve
    from parity.sides.impl import load_image_parts

    side, manifest = D.read(input_dump)
    where = input_dump / "manifest.json"
    try:
        spec = spec_of(manifest["settings"], str(where))
    except Exception as e:  # noqa: BLE001 - the settings are another program's: name the file
        raise D.DumpError(f"{where}: settings do not describe a run ({e})") from None
    if spec.dtype != "float32":
        raise D.DumpError(f"{where}: dtype {spec.dtype}; the ONNX Runtime run is float32 only")
    runs = resolve(spec)
    rec = R.Recorder()
    for model in runs.models:
        calls = sorted({(f["step"], f["branch"]) for f, _ in side.values() if f["model"] == model.label
                        and f["layer"] == "input.latent_in" and f["branch"] in ("cond", "uncond")})
        if not calls:
            continue
        mmdit, _, _ = load_image_parts(model, runs.opts, torch.float32)
        graph, names = _graph(mmdit.float()), _names(model.mmdit.depth)

        def inputs(step, branch):
            return [R.load(side[R.key({"model": model.label, "component": "sampler", "layer": f"input.{n}",
                                       "step": step, "branch": branch})][1]) for n in INPUTS]
        with tempfile.TemporaryDirectory(prefix="sd3parity-onnx-") as tmp:
            path = Path(tmp) / "mmdit.onnx"
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(graph, tuple(inputs(*calls[0])), str(path), dynamo=False, opset_version=18,
                                  input_names=list(INPUTS), output_names=names)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for step, branch in calls:
            feeds = {n: t.numpy() for n, t in zip(INPUTS, inputs(step, branch))}
            for name, value in zip(names, session.run(names, feeds)):
                rec.put(torch.from_numpy(value), model=model.label, component="mmdit", layer=name, step=step,
                        branch=branch)
    records = rec.side()
    if not records:
        raise D.DumpError(f"{input_dump}: no transformer call (input.* records of a cond or uncond branch) to run")
    producer = {"name": "onnxruntime", "version": ort.__version__, "onnx_opset": 18, "exported_from": "impl MMDiT",
                "threads": threads}
    return D.write(out, records, manifest["settings"], producer)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.onnx_mmdit", description=__doc__.split("\n\n")[0])
    ap.add_argument("input_dump", help="an sd3parity dump holding the transformer calls' inputs")
    ap.add_argument("out", help="the dump directory to create")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    args = ap.parse_args(argv)
    try:
        n = run(Path(args.input_dump), Path(args.out), args.threads)
    except (ValueError, OSError) as e:
        print(f"onnx_mmdit: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"onnx_mmdit: {e}: install onnx and onnxruntime (pip install -e '.[onnx]')", file=sys.stderr)
        return 3
    print(f"wrote {args.out}: {n} records of ONNX Runtime")
    return 0


if __name__ == "__main__":
    sys.exit(main())
