"""`training/pretrain.py` under accelerate's FSDP on CPU processes (gloo), for tests.

accelerate turns `distributed_type: FSDP` into plain multi-CPU DDP when there is no GPU (docs/pitfalls.md §21), so
this launcher lets it set up the gloo process group first and then switches its state to FSDP with the plugin the
launcher's config describes (`FSDP_*` environment variables). Everything after that (wrapping, training, sharded checkpoints, the
gathered model) is accelerate's and torch's own FSDP code.

    accelerate launch --config_file training/accelerate_configs/fsdp.yaml --num_processes 2 --mixed_precision no \
        tests/fsdp_on_cpu.py ARGS-OF-pretrain.py
"""

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from automae_hf.training import pretraining

make_accelerator = pretraining.make_accelerator


def make_fsdp_accelerator(args):
    accelerator = make_accelerator(args)
    assert accelerator.distributed_type == DistributedType.MULTI_CPU, accelerator.distributed_type
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = FullyShardedDataParallelPlugin()
    assert accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2
    return accelerator


pretraining.make_accelerator = make_fsdp_accelerator

if __name__ == "__main__":
    pretraining.main()
