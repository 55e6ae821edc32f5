"""Trains the discriminator alone, to see whether it can learn at all (docs/method.md §5, §8).

D is trained with its own least-squares loss on pseudo-real box-prior maps (`sample_box_prior`) against generated maps:
Gumbel-Softmax samples of fixed score logits, as the mask generator draws them. Three kinds of generated maps:

- `uniform`: logits all equal (what an untrained score head gives; the Gumbel noise alone shapes the sample);
- `peaky`: fixed random logits of standard deviation 3 (a head that prefers a few patches; easy to tell apart);
- `score_head`: an untrained `AutoMAEScoreHead` on random attention-like maps (a real head's first outputs).

Each setting prints the first step's loss, then over the last fifth of the steps the mean loss, real and fake
accuracies (at D's 0.5 threshold on the targets 1 / 0) and mean raw scores. Settings vary the input scale
(`discriminator_input_scale`), the learning rate, the grid and the spectral norm's power iterations. The positive
control (peaky fakes, inputs scaled) must separate; its failure means the instrument is broken.

    python benchmarks/discriminator_only.py              # every setting (13), under a minute on 2 CPU cores
    python benchmarks/discriminator_only.py --steps 100 --batch_size 64 --only reference,scaled
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from automae_hf.masking import gumbel_softmax_sample, sample_box_prior
from automae_hf.modeling_automae import AutoMAEDiscriminator, AutoMAEScoreHead

# name -> (grid, input scale, learning rate, fake kind, spectral-norm power iterations)
SETTINGS = {
    "reference": ((7, 7), "none", 7.5e-4, "uniform", 1),
    "reference_peaky": ((7, 7), "none", 7.5e-4, "peaky", 1),
    "reference_lr1e-2": ((7, 7), "none", 1e-2, "uniform", 1),
    "reference_power5": ((7, 7), "none", 7.5e-4, "uniform", 5),
    "reference_14x14": ((14, 14), "none", 7.5e-4, "uniform", 1),
    "scaled": ((7, 7), "num_patches", 7.5e-4, "uniform", 1),
    "scaled_peaky": ((7, 7), "num_patches", 7.5e-4, "peaky", 1),  # the positive control
    "scaled_score_head": ((7, 7), "num_patches", 7.5e-4, "score_head", 1),
    "reference_score_head": ((7, 7), "none", 7.5e-4, "score_head", 1),
    "scaled_lr1e-4": ((7, 7), "num_patches", 1e-4, "uniform", 1),
    "scaled_power5": ((7, 7), "num_patches", 7.5e-4, "uniform", 5),
    "scaled_8x8": ((8, 8), "num_patches", 7.5e-4, "uniform", 1),
    "scaled_14x14": ((14, 14), "num_patches", 7.5e-4, "uniform", 1),
}
POSITIVE_CONTROL = "scaled_peaky"


def fake_log_probs(kind: str, batch_size: int, grid: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """`[B, L]` log-probabilities whose Gumbel samples are the generated maps (fixed for the whole run)."""
    num_patches = grid[0] * grid[1]
    if kind == "uniform":
        logits = torch.zeros(1, num_patches)
    elif kind == "peaky":
        logits = 3.0 * torch.randn(1, num_patches, generator=generator)
    elif kind == "score_head":
        heads = 4
        attention = torch.softmax(torch.randn(batch_size, heads, num_patches, generator=generator), -1)
        with torch.no_grad():
            return AutoMAEScoreHead(heads)(attention.view(batch_size, heads, *grid))
    else:
        raise ValueError(f"unknown fake kind {kind!r}")
    return torch.log_softmax(logits, -1).expand(batch_size, -1)


def train_discriminator(grid, input_scale, lr, fake_kind, power_iterations, steps, batch_size, seed=0) -> dict:
    """Adam on D's least-squares loss for `steps` steps; -> the first loss and last-fifth means."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    discriminator = AutoMAEDiscriminator(grid, input_scale=input_scale)
    for conv in (discriminator.conv1, discriminator.conv2, discriminator.conv3):
        conv.parametrizations.weight[0].n_power_iterations = power_iterations
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=lr)
    log_probs = fake_log_probs(fake_kind, batch_size, grid, generator)
    history = []
    for _ in range(steps):
        real = sample_box_prior(batch_size, grid, 0.5, generator)
        fake = gumbel_softmax_sample(log_probs, 1.0, None, generator)
        scores = discriminator(torch.cat([real, fake]), grid_size=grid)
        real_scores, fake_scores = scores[:batch_size], scores[batch_size:]
        loss = ((real_scores - 1) ** 2).mean() + (fake_scores**2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(torch.stack([loss, (real_scores > 0.5).float().mean(), (fake_scores < 0.5).float().mean(),
                                    real_scores.mean(), fake_scores.mean()]).detach())
    history = torch.stack(history)
    last = history[-max(1, steps // 5):].mean(0).tolist()
    return {"first_loss": history[0, 0].item(), "last_loss": last[0], "real_accuracy": last[1],
            "fake_accuracy": last[2], "real_score": last[3], "fake_score": last[4]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--only", default=None, help="comma-separated setting names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(SETTINGS)
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown settings {unknown}; known: {sorted(SETTINGS)}")
    torch.set_num_threads(1)  # a tiny network: threads only add contention on a shared machine
    results = {}
    for name in names:
        grid, input_scale, lr, fake_kind, power_iterations = SETTINGS[name]
        start = time.perf_counter()
        result = train_discriminator(grid, input_scale, lr, fake_kind, power_iterations, args.steps, args.batch_size,
                                     args.seed)
        results[name] = result
        row = {"setting": name, "grid": f"{grid[0]}x{grid[1]}", "input_scale": input_scale, "lr": lr,
               "fake": fake_kind, "power_iterations": power_iterations,
               **{key: round(value, 4) for key, value in result.items()},
               "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps(row), flush=True)
    if POSITIVE_CONTROL in results:
        control = results[POSITIVE_CONTROL]
        separated = control["real_accuracy"] > 0.9 and control["fake_accuracy"] > 0.9
        print(f"positive control {POSITIVE_CONTROL}: {'separates' if separated else 'FAILED to separate'}")
    return results


if __name__ == "__main__":
    main()
