"""Training-step time of AutoMAEForPreTraining against transformers' ViTMAEForPreTraining, same student config,
interleaved in one process so both see the same machine state. Prints medians and ratios.

    python benchmarks/speed.py                 # tiny 32 px model (CPU, ~1 min)
    python benchmarks/speed.py --size vit-s16  # ViT-S/16 at 224 px, standard 512x8 decoder
"""

import argparse
import statistics
import time

import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining
from transformers.utils import logging

from automae_hf import AutoMAEConfig, AutoMAEForPreTraining

logging.set_verbosity_error()

SIZES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, image_size=32,
                 patch_size=4, decoder_hidden_size=64, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                 decoder_intermediate_size=256),
    "vit-s16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                    image_size=224, patch_size=16),
    "vit-b16": dict(image_size=224, patch_size=16),
}


def automae_step(model, student_optimizer, d_optimizer, pixel_values, attention=None):
    """One iteration of shared doc §3: teacher attention once -> D step -> student + score-head step.
    `attention` given: the cached-teacher mode (maps computed once per image, `--cache_teacher_attention`)."""
    if attention is None:
        attention = model.mask_generator.teacher_attention(pixel_values)
    d_optimizer.zero_grad(set_to_none=True)
    model.discriminator_loss(teacher_attention=attention).loss.backward()
    d_optimizer.step()
    student_optimizer.zero_grad(set_to_none=True)
    model(pixel_values, teacher_attention=attention).loss.backward()
    student_optimizer.step()


def mae_step(model, optimizer, pixel_values):
    optimizer.zero_grad(set_to_none=True)
    model(pixel_values).loss.backward()
    optimizer.step()


def teacher_forward(model, pixel_values):
    model.mask_generator.teacher_attention(pixel_values)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per arm (after 3 warm-up steps)")
    args = parser.parse_args()

    kwargs = dict(SIZES[args.size], norm_pix_loss=True)
    torch.manual_seed(0)
    automae = AutoMAEForPreTraining(AutoMAEConfig(**kwargs)).train()
    mae = ViTMAEForPreTraining(ViTMAEConfig(**kwargs, attn_implementation="sdpa")).train()
    student_optimizer = torch.optim.AdamW(automae.student_parameters(), lr=1e-4, betas=(0.9, 0.95))
    d_optimizer = torch.optim.Adam(automae.discriminator_parameters(), lr=1e-4)
    mae_optimizer = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
    size = kwargs["image_size"]
    pixel_values = torch.randn(args.batch_size, 3, size, size)

    with torch.no_grad():
        cached = automae.mask_generator.teacher_attention(pixel_values)
    from transformers import ViTConfig, ViTModel

    from automae_hf import AutoMAEModel

    encoder = AutoMAEModel(automae.config).eval()
    vit_fields = {k: v for k, v in kwargs.items() if not k.startswith("decoder_") and k != "norm_pix_loss"}
    vit = ViTModel(ViTConfig(**vit_fields, attn_implementation="sdpa"), add_pooling_layer=False).eval()

    def inference(model):
        with torch.no_grad():
            model(pixel_values)

    arms = {
        "ViTMAEForPreTraining step": lambda: mae_step(mae, mae_optimizer, pixel_values),
        "AutoMAEForPreTraining step (teacher + D + student)": lambda: automae_step(
            automae, student_optimizer, d_optimizer, pixel_values
        ),
        "teacher CLS attention alone": lambda: teacher_forward(automae, pixel_values),
        "AutoMAE step, cached teacher attention (D + student)": lambda: automae_step(
            automae, student_optimizer, d_optimizer, pixel_values, cached
        ),
        "ViTModel inference (SDPA)": lambda: inference(vit),
        "AutoMAEModel inference (SDPA)": lambda: inference(encoder),
    }
    times = {name: [] for name in arms}
    for _ in range(3):
        for run in arms.values():
            run()
    for _ in range(args.steps):
        for name, run in arms.items():  # interleaved
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    t_mae, t_auto, t_teacher, t_cached, t_vit, t_encoder = median.values()
    print(f"size={args.size} batch={args.batch_size} steps={args.steps} threads={torch.get_num_threads()} "
          f"torch={torch.__version__}")
    for name, value in median.items():
        print(f"  {name:55s} {value * 1000:9.1f} ms")
    print(f"  ratio AutoMAE / MAE                                     {t_auto / t_mae:9.3f}")
    print(f"  floor 1 + t_teacher / t_MAE                             {1 + t_teacher / t_mae:9.3f}")
    print(f"  overhead beyond the teacher (t_A - t_M - t_T) / t_M     {(t_auto - t_mae - t_teacher) / t_mae:9.3f}")
    print(f"  ratio cached-teacher AutoMAE / MAE                      {t_cached / t_mae:9.3f}")
    print(f"  ratio encoder inference AutoMAEModel / ViTModel         {t_encoder / t_vit:9.3f}")


if __name__ == "__main__":
    main()
