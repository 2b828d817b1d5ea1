"""The step's attention, patch-embedding and last-block kernels and its text tower alone, each way they can run, at the
step's shapes.

    python -m benchmarks.kernel_bench [--model ViT-B-16-quickgelu] [--batches 128x128] [--frames 4] [--device auto]
        [--out DIR]

Seconds of GPU time instead of the minutes a compiled step variant takes, so ``benchmarks/gpu_step.sh`` can pick the
levers its step variants then time.

- **Attention**: ``F.scaled_dot_product_attention`` as the step calls it, on views of a packed QKV projection
  (``train.attention.packed_attention``), in bf16 on the GPU: the student's image tower over (L+U)*T frames and its
  text tower over L+U captions (causal float mask; at the width the trainer cuts them to), forward and backward;
  the teacher's towers over U*T frames and U captions, forward only. Each call is timed with one kernel allowed at a
  time, and with torch's own choice ("auto"). The step's attention time is each call's time times the tower's
  layers. With ``--attention_kernel X`` a call X cannot serve falls back to the next kernel in
  ``train.attention.TORCH_ORDER``; the total for X counts that kernel there.
- **Patch embedding**: the convolution as open_clip runs it against ``train.patch_embed.linear_patch_embed`` on
  the same weight: the student's forward and weight gradient, the teacher's forward.
- **Last block**: the image tower's last block on every row against ``train.cls_last_block.cls_last_block`` (the
  class token's row only), eager: the student's forward and backward, the teacher's forward.
- **Text tower**: the whole text tower at the full context length against the captions cut after the longest of
  their batch (``--trim_text``, the trainer's default), eager: the student's forward and backward, the teacher's
  forward. A record of what the default gains, not a lever to choose.

Prints each timing. With ``--out DIR`` it also writes ``DIR/kernels.json`` (without it, nothing is written): the rows,
the step's attention time with each kernel first, the fastest (``best_attention_kernel``, an ``--attention_kernel``
value), the patch embedding's two times, the last block's two times, the text tower's two times, and the
``benchmarks.step_variants`` options they favour (``step_levers``: ``patch``, ``cls``, a kernel), which gpu_step.sh
then times in the whole step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from benchmarks.harness import (
    image_tokens,
    kernel_setup,
    relative_difference,
    synthetic_batch,
    time_call,
    training_call,
)
from pipeline.cli import fire_main
from pipeline.writer import atomic_write_bytes, json_bytes
from train.attention import KERNELS, TORCH_ORDER
from train.cls_last_block import cls_last_block
from train.model import encode_text, image_size, tokenizer_for, trim_padding, trims_text
from train.patch_embed import linear_patch_embed

NAMES = {kernel: name for name, kernel in KERNELS.items() if kernel is not None}  # SDPBackend -> flag value
MARGIN = 1.02  # a way must beat the other by this much, beyond timing noise, to be tried in the step


def attention_call(
    batch: int, tokens: int, heads: int, head_dim: int, backward: bool, mask: bool, device, dtype
) -> Callable[[], object]:
    """One self-attention call of a tower: q, k, v as strided views of a packed (B, N, 3, heads, head_dim) tensor,
    the float causal mask of open_clip's text tower if ``mask``, in ``dtype``; forward, or forward and backward.

    The mask is in ``dtype`` as the step's reaches SDPA: ``train.attention`` casts it to the text tower's residual
    stream (float32 under autocast), and CUDA autocast then casts every floating input of
    ``scaled_dot_product_attention`` to bf16. (A float32 mask beside bf16 q, k, v outside autocast is another call:
    the memory-efficient kernel refuses it, "invalid dtype for bias - should match query's dtype".)"""
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, device=device, dtype=dtype, generator=gen)
    qkv.requires_grad_(backward)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    attn_mask = None
    if mask:
        attn_mask = torch.full((tokens, tokens), float("-inf"), device=device, dtype=dtype).triu_(1)
    grad = torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype, generator=gen)

    def call():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        if backward:
            out.backward(grad)
            qkv.grad = None
        return out

    return call


def caption_widths(model: str, clip: torch.nn.Module, n_lab: int, n_unl: int) -> tuple[torch.Tensor, int]:
    """The step variants' synthetic captions (``benchmarks.harness.synthetic_batch``, 4-40 words) of both batches as
    the tokenizer pads them, (L+U, context), and the width the trainer runs them at: cut by its loader
    (``train.model.trim_padding``, the wider batch's) for a model ``train.model.trims_text`` accepts, else the
    context length."""
    tokenizer = tokenizer_for(model)
    tokens = [synthetic_batch(n, 1, 1, tokenizer, k + 1, False).tokens for k, n in enumerate((n_lab, n_unl))]
    joined = torch.cat(tokens)
    return joined, max(trim_padding(t).shape[1] for t in tokens) if trims_text(clip) else joined.shape[1]


def tower_shapes(clip: torch.nn.Module, frames: int, n_lab: int, n_unl: int, text_width: int) -> list[dict]:
    """The step's attention calls, one per tower and model: batch, tokens (the captions' at ``text_width``, as the
    trainer cuts them), heads, head size, layers, backward."""
    vision, text = clip.visual.transformer, clip.transformer
    v_attn, t_attn = vision.resblocks[0].attn, text.resblocks[0].attn
    v_tokens = image_tokens(clip)
    t_tokens = text_width
    calls = []
    for who, n, backward in (("student", n_lab + n_unl, True), ("teacher", n_unl, False)):
        for tower, batch, tokens, attn, layers, mask in (
            ("image", n * frames, v_tokens, v_attn, len(vision.resblocks), False),
            ("text", n, t_tokens, t_attn, len(text.resblocks), True),
        ):
            calls.append(
                dict(
                    call=f"{who} {tower}",
                    batch=batch,
                    tokens=tokens,
                    heads=attn.num_heads,
                    head_dim=attn.head_dim,
                    layers=layers,
                    backward=backward,
                    mask=mask,
                )
            )
    return calls


def attention_rows(calls: list[dict], device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Each call timed under each kernel alone and under torch's own choice ("auto"); None where it cannot run."""
    rows = []
    for spec in calls:
        shape = (spec[k] for k in ("batch", "tokens", "heads", "head_dim", "backward", "mask"))
        fn = attention_call(*shape, device, dtype)
        row = dict(spec)
        try:  # torch's own choice can fail where the kernel it picks refuses the call: recorded, not fatal
            row["auto"] = time_call(fn, device)
        except RuntimeError as e:
            row["auto"], row["auto_error"] = None, str(e)[:200]
        for kernel in TORCH_ORDER:
            try:
                with sdpa_kernel([kernel]):
                    row[NAMES[kernel]] = time_call(fn, device)
            except RuntimeError:  # "No available kernel": this kernel cannot serve this call here
                row[NAMES[kernel]] = None
        rows.append(row)
        times = (f"{k} {1e3 * row[k]:.3f} ms" if row[k] is not None else f"{k} -" for k in ("auto", *NAMES.values()))
        print(
            f"  {spec['call']} ({spec['batch']}x{spec['tokens']} tokens, {spec['heads']} heads"
            f"{', backward' if spec['backward'] else ''}): " + ", ".join(times),
            flush=True,
        )
    return rows


def step_attention_s(rows: list[dict]) -> dict[str, float]:
    """The step's attention seconds with each --attention_kernel: each call's time with that kernel, or with the
    first kernel after it in torch's order that can serve the call, times the tower's layers ("auto": torch's own
    choice, left out where it failed a call)."""
    totals = {} if any(r["auto"] is None for r in rows) else {"auto": sum(r["auto"] * r["layers"] for r in rows)}
    for first in TORCH_ORDER:
        order = [first, *(k for k in TORCH_ORDER if k != first)]
        total = 0.0
        for r in rows:
            served = next((r[NAMES[k]] for k in order if r[NAMES[k]] is not None), None)
            if served is None:
                break
            total += served * r["layers"]
        else:
            totals[NAMES[first]] = total
    return totals


def best_kernel(totals: dict[str, float]) -> str:
    """The --attention_kernel value to try in the step: the fastest, unless "auto" is within ``MARGIN`` of it (or
    nothing served every call)."""
    if not totals:
        return "auto"
    fastest = min(totals, key=totals.get)
    return "auto" if "auto" in totals and totals["auto"] <= totals[fastest] * MARGIN else fastest


def step_levers(best_attention_kernel: str, patch: dict | None, last_block: dict | None) -> list[str]:
    """The ``benchmarks.step_variants`` options these figures favour: +patch where the matrix product beat the
    convolution by ``MARGIN``, +cls where the class token's row beat the whole last block by it, and the attention
    kernel where one beat torch's own choice. A section not measured (None) or that failed (``{"error": ...}``)
    advises nothing."""
    patch, last_block = patch or {"error": "not measured"}, last_block or {"error": "not measured"}
    levers = ["patch"] if "error" not in patch and patch["conv"] >= patch["linear"] * MARGIN else []
    levers += ["cls"] if "error" not in last_block and last_block["full"] >= last_block["cls"] * MARGIN else []
    return levers + ([best_attention_kernel] if best_attention_kernel != "auto" else [])


def student_and_teacher_s(way, student_in: tuple, teacher_in: tuple, grad, trained: list, device, autocast) -> float:
    """Seconds per step of one way of a layer: the student's forward and backward (``way(*student_in)``, gradient
    ``grad``; the ``trained`` tensors' gradients cleared after) plus the teacher's forward (``way(*teacher_in)``
    under inference mode), both under ``autocast`` as the step runs them."""

    def teacher():
        with torch.inference_mode(), autocast:
            return way(*teacher_in)

    return time_call(training_call(way, student_in, grad, trained, autocast), device) + time_call(teacher, device)


def patch_rows(clip: torch.nn.Module, frames: int, n_lab: int, n_unl: int, device, dtype) -> dict:
    """The patch embedding per step, the convolution against linear_patch_embed: seconds of the student's forward and
    weight gradient plus the teacher's forward, under autocast as the step runs them."""
    size = image_size(clip)
    conv = clip.visual.conv1
    weight = conv.weight.detach().to(device).requires_grad_(True)
    teacher_weight = weight.detach().to(dtype)  # the teacher holds bf16 weights on the GPU
    gen = torch.Generator(device=device).manual_seed(0)
    images = {
        who: torch.randn(n * frames, 3, size, size, device=device, generator=gen)
        for who, n in (("student", n_lab + n_unl), ("teacher", n_unl))
    }
    stride = conv.stride
    ways = {
        "conv": lambda x, w: F.conv2d(x, w, stride=stride),
        "linear": lambda x, w: linear_patch_embed(x, w),
    }
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    grid = size // conv.kernel_size[0]
    grad = torch.randn(images["student"].shape[0], weight.shape[0], grid, grid, device=device, dtype=dtype)
    row = {"images_student": images["student"].shape[0], "images_teacher": images["teacher"].shape[0]}
    for name, way in ways.items():
        ins = (images["student"], weight), (images["teacher"], teacher_weight)
        row[name] = student_and_teacher_s(way, *ins, grad, [weight], device, autocast)
    with torch.no_grad(), autocast:  # the same function: compare the two at the dtype the step runs them in
        a = ways["conv"](images["teacher"][:8], weight).float()
        b = ways["linear"](images["teacher"][:8], weight).float()
    row["max_relative_difference"] = relative_difference(a, b)
    print(
        f"  patch embedding ({row['images_student']} + {row['images_teacher']} images): "
        f"conv {1e3 * row['conv']:.3f} ms, linear {1e3 * row['linear']:.3f} ms ({row['conv'] / row['linear']:.2f}x); "
        f"largest difference {row['max_relative_difference']:.1e} of the largest output",
        flush=True,
    )
    return row


def last_block_rows(clip: torch.nn.Module, frames: int, n_lab: int, n_unl: int, device, dtype) -> dict:
    """The image tower's last block per step, on every row (as open_clip runs it, the class token's row taken after)
    against ``cls_last_block``: seconds of the student's forward and backward plus the teacher's forward, eager,
    under autocast as the step runs them."""
    tokens = image_tokens(clip)
    block = copy.deepcopy(clip.visual.transformer.resblocks[-1]).to(device)
    teacher_block = copy.deepcopy(block).to(dtype).eval().requires_grad_(False)  # bf16 weights on the GPU
    width = block.attn.embed_dim
    gen = torch.Generator(device=device).manual_seed(0)
    rows = {
        who: torch.randn(n * frames, tokens, width, device=device, dtype=dtype, generator=gen)
        for who, n in (("student", n_lab + n_unl), ("teacher", n_unl))
    }
    rows["student"].requires_grad_(True)
    grad = torch.randn(rows["student"].shape[0], 1, width, device=device, dtype=dtype, generator=gen)
    ways = {"full": lambda b, x: b(x)[:, :1], "cls": cls_last_block}
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    row = {"images_student": rows["student"].shape[0], "images_teacher": rows["teacher"].shape[0], "tokens": tokens}
    trained = [rows["student"], *block.parameters()]
    for name, way in ways.items():
        ins = (block, rows["student"]), (teacher_block, rows["teacher"])
        row[name] = student_and_teacher_s(way, *ins, grad, trained, device, autocast)
    with torch.no_grad(), autocast:  # the same function: compare the two at the dtype the step runs them in
        a = ways["full"](block, rows["teacher"][:8]).float()
        b = ways["cls"](block, rows["teacher"][:8]).float()
    row["max_relative_difference"] = relative_difference(a, b)
    print(
        f"  last block ({row['images_student']} + {row['images_teacher']} images of {tokens} tokens): "
        f"every row {1e3 * row['full']:.3f} ms, class token's row {1e3 * row['cls']:.3f} ms "
        f"({row['full'] / row['cls']:.2f}x); largest difference {row['max_relative_difference']:.1e} of the largest "
        "output",
        flush=True,
    )
    return row


def text_tower_rows(clip: torch.nn.Module, captions: tuple[torch.Tensor, int], n_lab: int, device, dtype) -> dict:
    """The text tower per step at the full context length against the ``captions`` (``caption_widths``) cut as the
    trainer cuts them (``--trim_text``): seconds of the student's forward and backward over L+U captions plus the
    teacher's forward over U, eager, under autocast as the step runs them."""
    tokens, width = captions
    n_unl = tokens.shape[0] - n_lab
    student = copy.deepcopy(clip).to(device)
    teacher = copy.deepcopy(clip).to(device, dtype).eval().requires_grad_(False)  # bf16 weights on the GPU
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    joined = tokens.to(device)  # (L+U, context)
    grad = torch.randn(joined.shape[0], clip.text_projection.shape[-1], device=device, dtype=dtype)
    row = {"captions_student": joined.shape[0], "captions_teacher": n_unl, "context": joined.shape[1], "width": width}
    for name, cols in (("full", joined.shape[1]), ("trimmed", width)):
        ins = (student, joined[:, :cols]), (teacher, joined[n_lab:, :cols])
        row[name] = student_and_teacher_s(encode_text, *ins, grad, list(student.parameters()), device, autocast)
    print(
        f"  text tower ({row['captions_student']} + {row['captions_teacher']} captions): {row['context']} tokens "
        f"{1e3 * row['full']:.3f} ms, cut to {width} {1e3 * row['trimmed']:.3f} ms "
        f"({row['full'] / row['trimmed']:.2f}x)",
        flush=True,
    )
    return row


def main(
    model: str = "ViT-B-16-quickgelu", batches: str = "128x128", frames: int = 4, device: str = "auto", out: str = ""
) -> dict:
    """Time the step's attention calls per kernel, and its patch embedding, the image tower's last block and the text
    tower both ways; with --out DIR, write DIR/kernels.json.

    Args:
        model: open_clip model name or model-config JSON (random weights, nothing is downloaded).
        batches: the step's batch as one LxU (L labeled + U unlabeled videos), e.g. 128x128.
        frames: frames per video.
        device: auto, cuda or cpu; bf16 autocast on a GPU, fp32 on the CPU.
        out: folder to write kernels.json into; "" = print only, write nothing.
    """
    setup = kernel_setup(model, batches, device, frames, out)
    n_lab, n_unl, dev, dtype, clip, name = setup
    print(
        f"kernel_bench: {name}, torch {torch.__version__}, {model}, {n_lab}+{n_unl} videos of {frames} frames, {dtype}"
    )
    captions = caption_widths(model, clip, n_lab, n_unl)
    rows = attention_rows(tower_shapes(clip, frames, n_lab, n_unl, captions[1]), dev, dtype)
    totals = step_attention_s(rows)
    best = best_kernel(totals)
    described = (f"{k} {1e3 * v:.2f} ms" if k == "auto" else f"{k} first {1e3 * v:.2f} ms" for k, v in totals.items())
    print(f"  the step's attention: {', '.join(described)}; to try in the step: --attention_kernel {best}", flush=True)
    record = {
        **setup.header(model, frames),
        "attention": rows,
        "step_attention_s": totals,
        "best_attention_kernel": best,
    }
    sections = {
        "patch_embed": lambda: patch_rows(clip, frames, n_lab, n_unl, dev, dtype),
        "last_block": lambda: last_block_rows(clip, frames, n_lab, n_unl, dev, dtype),
        "text_tower": lambda: text_tower_rows(clip, captions, n_lab, dev, dtype),
    }

    def save() -> None:  # with the levers of what is measured so far: a part cut off by its time limit leaves a
        # kernels.json that gpu_step.sh chooses LEVERS from (without the levers not measured)
        record["step_levers"] = step_levers(best, record.get("patch_embed"), record.get("last_block"))
        _write(record, out)

    for key, measure in sections.items():  # saved before each section, and at the end
        save()
        try:
            record[key] = measure()
        except Exception as e:  # e.g. a kernel this GPU refuses, or out of memory: its lever is not advised
            record[key] = {"error": f"{type(e).__name__}: {e}"[:1000]}
            print(f"  {key}: failed, {record[key]['error'].splitlines()[0]}", flush=True)
    save()
    print(f"  step_variants options to try: {', '.join('+' + o for o in record['step_levers']) or 'none'}")
    return record


def _write(record: dict, out: str) -> None:
    """OUT/kernels.json holding ``record`` (nothing without --out)."""
    if out:
        Path(str(out)).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(str(out)) / "kernels.json", json_bytes(record))


if __name__ == "__main__":
    fire_main(main, serialize=lambda record: None)  # main printed it already
