"""Training in several processes, all through torch.distributed and accelerate: `launch` restarts
`tuneforge train` under torchrun (LLaMA-Factory's FORCE_TORCHRUN / NNODES / NPROC_PER_NODE ...),
`plugins` turns the config's fsdp / fsdp_config / deepspeed / ddp_* keys into accelerate's plugins
and kwargs handlers, `sharded` gathers an FSDP2 model's shards for saving."""
