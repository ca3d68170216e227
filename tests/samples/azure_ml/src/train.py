# Stand-in for cli/jobs/single-step/pytorch/cifar-distributed/src/train.py: the same
# arguments, and the torch.distributed environment muster sets, without torch.
import argparse, os
p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int)
p.add_argument("--learning-rate", type=float)
p.add_argument("--data-dir")
a = p.parse_args()
files = sorted(os.listdir(a.data_dir))
print(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} "
      f"(master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}) "
      f"epochs={a.epochs} lr={a.learning_rate} data={files}")
