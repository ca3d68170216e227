# Stand-in for a v1 HyperDrive training script: reads --penalty, logs Accuracy.
import argparse
p = argparse.ArgumentParser()
p.add_argument("--penalty", type=float)
a = p.parse_args()
print(f"##muster[metric] name=Accuracy value={1.0 / (1.0 + a.penalty)}")
