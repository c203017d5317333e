"""The settings a ComfyUI workflow names, for ``check --workflow FILE``.

Both formats ComfyUI saves are read: the API format (``{"3": {"class_type": "KSampler", "inputs": {"seed": 5,
"model": ["4", 0], ...}}}``) and the UI format (``{"nodes": [{"id": 3, "type": "KSampler", "widgets_values":
[...], "inputs": [{"name": "model", "link": 9}, ...]}], "links": [[9, from, slot, to, slot, type], ...]}``), whose
widget values are positional in the order of ``WIDGETS``. The run's settings come from the one ``KSampler`` and
what feeds it: its seed, steps, cfg, sampler and scheduler, denoise; the prompt of the ``CLIPTextEncode`` on its
positive input, or the three texts of a ``CLIPTextEncodeSD3`` there (``--prompt-clip-g`` / ``--prompt-t5``); the
negative, which must be the empty prompt (``CLIPTextEncode``, or ``CLIPTextEncodeSD3`` with three empty texts: the
``empty_padding`` of these nodes is ``--empty-padding``), its ``ConditioningZeroOut``, or the older SD3
workflows' ``ConditioningCombine`` of the empty prompt on ``ConditioningSetTimestepRange(0, p)`` and its zeros on
``(p, 1)`` (``--negative-zero``); the size of an
``EmptySD3LatentImage`` or, through ``VAEEncode``, img2img from a ``LoadImage`` (the picture itself is ``--image``);
the shift of a ``ModelSamplingSD3`` and the layers of a ``SkipLayerGuidanceSD3`` on its model input. Models are the
user's ``--model`` / ``--checkpoint``: the workflow's file names are only reported. A node the harness does not
reproduce on that path is refused by name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from parity.run import Unsupported, UsageError

# UI-format widget order per node type (ComfyUI's frontend adds control_after_generate after a seed)
WIDGETS = {
    "KSampler": ("seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"),
    "EmptySD3LatentImage": ("width", "height", "batch_size"),
    "CLIPTextEncode": ("text",),
    "ModelSamplingSD3": ("shift",),
    "SkipLayerGuidanceSD3": ("layers", "scale", "start_percent", "end_percent"),
    "CheckpointLoaderSimple": ("ckpt_name",),
    "LoadImage": ("image", "upload"),
    "ConditioningSetTimestepRange": ("start", "end"),
    "CLIPTextEncodeSD3": ("clip_l", "clip_g", "t5xxl", "empty_padding"),
}
SAMPLERS = {"euler": "sai_euler", "dpmpp_2m": "sai_dpmpp_2m"}  # KSampler sampler_name -> the sampler flag
SCHEDULERS = {"normal": "sai", "sgm_uniform": "sgm_uniform", "simple": "simple"}  # -> the schedule flag


@dataclass
class Node:
    id: str
    type: str
    values: dict  # widget values by name
    links: dict  # input name -> source node id


@dataclass
class Settings:
    prompt: str | tuple[str, str, str]  # CLIPTextEncode's text, or CLIPTextEncodeSD3's clip_l, clip_g, t5xxl
    seed: int
    steps: int
    guidance: float
    flags: dict  # sampler, schedule
    height: int | None = None
    width: int | None = None
    strength: float | None = None  # img2img (a VAEEncode latent)
    shift: float | None = None
    slg: tuple[int, ...] = ()
    negative_zero: float | None = None  # the zeroed negative (``--negative-zero``)
    empty_padding: str = "empty_prompt"  # the CLIPTextEncodeSD3 nodes' empty_padding (``--empty-padding``)
    notes: list[str] = field(default_factory=list)


def read(path: str | Path) -> dict[str, Node]:
    """The workflow's nodes, either format."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"--workflow {path}: not a readable JSON file ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        return _ui(data, path)
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        return _api(data)
    raise UsageError(f"--workflow {path}: neither ComfyUI's API format (node id -> class_type, inputs) nor its UI "
                     "format (nodes, links)")


def _api(data: dict) -> dict[str, Node]:
    out = {}
    for nid, n in data.items():
        inputs = n.get("inputs", {})
        links = {k: str(v[0]) for k, v in inputs.items() if isinstance(v, list) and len(v) == 2}
        out[str(nid)] = Node(str(nid), n["class_type"], {k: v for k, v in inputs.items() if k not in links}, links)
    return out


def _ui(data: dict, path: Path) -> dict[str, Node]:
    sources = {}
    for link in data.get("links", []):
        if not (isinstance(link, list) and len(link) >= 5):
            raise UsageError(f"--workflow {path}: a link {link!r} is not [id, from, slot, to, slot, type]")
        sources[link[0]] = str(link[1])
    out = {}
    for n in data["nodes"]:
        kind, values = n.get("type"), n.get("widgets_values") or []
        names = WIDGETS.get(kind, ())
        if kind in WIDGETS and isinstance(values, list) and len(values) < len(names) - (kind == "KSampler"):
            raise UsageError(f"--workflow {path}: node {n.get('id')} ({kind}) has {len(values)} widget values; "
                             f"expected {', '.join(names)}")
        if kind == "KSampler" and len(values) == len(names) - 1:  # saved without control_after_generate
            names = tuple(x for x in names if x != "control_after_generate")
        links = {i["name"]: sources[i["link"]] for i in n.get("inputs", []) if i.get("link") in sources}
        out[str(n["id"])] = Node(str(n["id"]), kind, dict(zip(names, values)) if isinstance(values, list) else {},
                                 links)
    return out


def settings(path: str | Path) -> Settings:
    """The run settings the workflow names (see the module docstring)."""
    nodes = read(path)
    samplers = [n for n in nodes.values() if n.type == "KSampler"]
    if len(samplers) != 1:
        kinds = sorted({n.type for n in nodes.values() if "Sampler" in n.type})
        raise Unsupported(f"--workflow {path}: {len(samplers)} KSampler nodes (samplers present: {kinds}); the "
                          "harness reads a workflow with exactly one KSampler")
    k = samplers[0]

    def source(node: Node, name: str) -> Node:
        if name not in node.links or node.links[name] not in nodes:
            raise UsageError(f"--workflow {path}: {node.type} {node.id} has no {name} input")
        return nodes[node.links[name]]

    def text(n: Node, what: str) -> str:
        if n.type != "CLIPTextEncode":
            raise Unsupported(f"--workflow {path}: the {what} comes from {n.type} {n.id}; the harness runs "
                              "CLIPTextEncode or CLIPTextEncodeSD3 conditioning into the sampler (and, for the "
                              "negative, ConditioningZeroOut and the timestep ranges of the older SD3 workflows)")
        return str(n.values.get("text", ""))

    padding = []  # where it matters: each node's empty padding (CLIPTextEncode pads as "empty_prompt")

    def positive(n: Node) -> str | tuple[str, str, str]:
        if n.type != "CLIPTextEncodeSD3":
            return text(n, "KSampler's positive")
        texts = tuple(str(n.values.get(k, "")) for k in ("clip_l", "clip_g", "t5xxl"))
        if not texts[2] or not (texts[0] or texts[1]):  # the node's padding decides the tokens of an empty T5
            padding.append(str(n.values.get("empty_padding", "none")))  # text or two empty CLIP texts (one is
            #                                       padded to the other's chunks with its empty prompt either way)
        return texts[0] if all(texts) and len(set(texts)) == 1 else texts

    def empty(n: Node, what: str) -> None:
        if n.type == "CLIPTextEncodeSD3":
            texts = [str(n.values.get(k, "")) for k in ("clip_l", "clip_g", "t5xxl")]
            if any(texts):
                raise Unsupported(f"--workflow {path}: CLIPTextEncodeSD3 {n.id} ({what}) has the texts {texts}; the "
                                  "harness runs the empty negative")
            padding.append(str(n.values.get("empty_padding", "none")))
            return
        padding.append("empty_prompt")
        t = text(n, what)
        if t != "":
            raise Unsupported(f"--workflow {path}: the negative prompt {t[:40]!r} ({what}); the harness runs the "
                              "empty negative (the SD3.5 templates' own)")

    def negative(n: Node) -> float | None:
        """None: the empty prompt; 0: its ConditioningZeroOut; p: the prompt on (0, p) and zeros on (p, 1)."""
        if n.type == "ConditioningZeroOut":
            empty(source(n, "conditioning"), "under ConditioningZeroOut")
            return 0.0
        if n.type != "ConditioningCombine":
            empty(n, "the KSampler's negative")
            return None
        ranges = {}
        for slot in ("conditioning_1", "conditioning_2"):
            r = source(n, slot)
            if r.type != "ConditioningSetTimestepRange":
                raise Unsupported(f"--workflow {path}: ConditioningCombine {n.id} combines {r.type} {r.id}; the "
                                  "harness reads the zeroed negative: two ConditioningSetTimestepRange inputs")
            inner = source(r, "conditioning")
            zeroed = inner.type == "ConditioningZeroOut"
            empty(source(inner, "conditioning") if zeroed else inner, f"ConditioningSetTimestepRange {r.id}")
            ranges[zeroed] = (float(r.values.get("start", 0.0)), float(r.values.get("end", 1.0)))
        p = ranges.get(False, (None, None))[1]
        if ranges.get(False, (None,))[0] != 0.0 or ranges.get(True) != (p, 1.0) or not 0 < p < 1:
            raise Unsupported(f"--workflow {path}: ConditioningCombine {n.id}: timestep ranges {ranges} (zeroed: "
                              "True); the harness runs the empty prompt on (0, p) and its zeros on (p, 1)")
        return p

    v = k.values
    if v.get("sampler_name") not in SAMPLERS or v.get("scheduler") not in SCHEDULERS:
        raise Unsupported(f"--workflow {path}: KSampler {v.get('sampler_name')!r} / {v.get('scheduler')!r}; impl "
                          f"reproduces samplers {sorted(SAMPLERS)} and schedulers {sorted(SCHEDULERS)}")
    zero = negative(source(k, "negative"))
    try:
        out = Settings(prompt=positive(source(k, "positive")), seed=int(v["seed"]), steps=int(v["steps"]),
                       guidance=float(v["cfg"]),
                       flags={"sampler": SAMPLERS[v["sampler_name"]], "schedule": SCHEDULERS[v["scheduler"]]})
        denoise = float(v.get("denoise", 1.0))
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"--workflow {path}: KSampler {k.id}: {type(e).__name__} {e}") from None
    out.negative_zero = zero
    if len(set(padding)) > 1:
        raise Unsupported(f"--workflow {path}: its text encoders pad empty texts differently ({sorted(set(padding))}: "
                          "CLIPTextEncodeSD3's empty_padding, CLIPTextEncode pads as empty_prompt); the harness runs "
                          "one rule (--empty-padding)")
    out.empty_padding = padding[0] if padding else "empty_prompt"
    latent = source(k, "latent_image")
    if latent.type == "EmptySD3LatentImage":
        if int(latent.values.get("batch_size", 1)) != 1:
            raise Unsupported(f"--workflow {path}: batch_size {latent.values['batch_size']}; the harness runs one image")
        out.height, out.width = int(latent.values["height"]), int(latent.values["width"])
        if denoise != 1.0:
            raise Unsupported(f"--workflow {path}: denoise {denoise} on an empty latent")
    elif latent.type == "VAEEncode":
        picture = source(latent, "pixels")
        out.strength = denoise
        out.notes.append(f"img2img from {picture.type} {picture.values.get('image', '')!r}: give the picture as --image")
    else:
        raise Unsupported(f"--workflow {path}: the KSampler's latent comes from {latent.type} {latent.id}")
    model = source(k, "model")
    while model.type != "CheckpointLoaderSimple":
        if model.type == "ModelSamplingSD3":
            out.shift = float(model.values["shift"])
        elif model.type == "SkipLayerGuidanceSD3":
            out.slg = tuple(int(x) for x in str(model.values.get("layers", "")).replace(",", " ").split())
            _check_defaults(model, path)
        else:
            raise Unsupported(f"--workflow {path}: the model passes through {model.type} {model.id}, which the harness "
                              "does not reproduce")
        model = source(model, "model")
    out.notes.append(f"settings from {Path(path).name}: its checkpoint {model.values.get('ckpt_name', '')!r} is "
                     "the user's --checkpoint / --model")
    return out


def _check_defaults(node: Node, path) -> None:
    """Skip-layer guidance runs with the node's defaults (the ``slg`` flag's comfyui value)."""
    from parity.flags import SLG_SCALES, SLG_WINDOWS

    start, end = SLG_WINDOWS["comfyui"]
    defaults = {"scale": SLG_SCALES["comfyui"], "start_percent": start, "end_percent": end}
    other = {k: node.values[k] for k, d in defaults.items() if k in node.values and float(node.values[k]) != d}
    if other:
        raise Unsupported(f"--workflow {path}: SkipLayerGuidanceSD3 {node.id} sets {other}; the harness runs its "
                          f"defaults {defaults}")
