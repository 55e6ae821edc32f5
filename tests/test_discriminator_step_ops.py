"""The D step's operator calls (each a kernel launch on a GPU) fall against the two-slice loss it replaced, with the
same loss, gradients and metrics bit for bit (CPU, seconds)."""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from automae_hf import AutoMAEForPreTraining
from automae_hf.modeling_automae import gumbel_softmax_sample, sample_box_prior


class CountOperators(TorchDispatchMode):
    """Counts every aten operator dispatched inside the block (forward, backward and optimizer alike)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def two_slice_loss(model, attention, generator):
    """L_D as the reference writes it: real and fake sliced out of one D call, each half's mean apart."""
    with torch.no_grad():
        fake = gumbel_softmax_sample(model.mask_generator.scores(attention), model.config.gumbel_tau, None, generator,
                                     model.config.gumbel_noise_scale)
        grid = tuple(attention.shape[-2:])
        real = sample_box_prior(fake.shape[0], grid, model.config.box_prior_alpha, generator, fake.device)
    scores = model.discriminator(torch.cat([real, fake]), grid_size=grid)
    real_scores, fake_scores = scores[: len(real)], scores[len(real) :]
    loss = ((real_scores - 1) ** 2).mean() + (fake_scores**2).mean()
    metrics = [(real_scores.detach() > 0.5).float().mean(), (fake_scores.detach() < 0.5).float().mean(),
               real_scores.detach().mean(), fake_scores.detach().mean()]
    return loss, metrics


def packed_loss(model, attention, generator):
    output = model.discriminator_loss(teacher_attention=attention, generator=generator)
    return output.loss, [output.real_accuracy, output.fake_accuracy, output.real_scores.mean(),
                         output.fake_scores.mean()]


def d_step(model, optimizer, loss_of, attention, seed):
    """One D step as the training loop takes it (fused Adam) -> (loss, metrics, D's gradients, operator calls)."""
    generator = torch.Generator().manual_seed(seed)
    with CountOperators() as counter:
        loss, metrics = loss_of(model, attention, generator)
        (loss / 2).backward()  # accumulation over 2 micro-batches: a gradient other than 1
        gradients = [p.grad.clone() for p in model.discriminator_parameters()]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), torch.stack(metrics), gradients, sum(counter.calls.values())


def test_d_step_needs_fewer_operator_calls_for_the_same_numbers(tiny_config):
    results = {}
    for loss_of in (two_slice_loss, packed_loss):
        torch.manual_seed(0)
        model = AutoMAEForPreTraining(tiny_config()).train()
        optimizer = torch.optim.Adam(model.discriminator_parameters(), lr=1e-2, betas=(0.9, 0.95), fused=True)
        attention = torch.rand(6, 2, 8, 8, generator=torch.Generator().manual_seed(1))
        d_step(model, optimizer, loss_of, attention, seed=0)  # the optimizer's state exists from here on
        results[loss_of.__name__] = d_step(model, optimizer, loss_of, attention, seed=1)
        results[loss_of.__name__] += ({k: v.clone() for k, v in model.discriminator.state_dict().items()},)
    (old_loss, old_metrics, old_grads, old_calls, old_weights), (loss, metrics, grads, calls, weights) = (
        results["two_slice_loss"], results["packed_loss"])
    assert torch.equal(loss, old_loss) and torch.equal(metrics, old_metrics)
    assert all(torch.equal(a, b) for a, b in zip(grads, old_grads))
    assert all(torch.equal(weights[k], old_weights[k]) for k in weights)
    assert calls < old_calls, (calls, old_calls)
    print(f"D step operator calls: {old_calls} with two slices, {calls} packed")
