# Stand-in for cli/jobs/basics/src/hello-sweep.py (which logs random_metric with mlflow).
import argparse, random
p = argparse.ArgumentParser()
p.add_argument("--A", type=float)
p.add_argument("--B", type=str)
p.add_argument("--C", type=float)
a = p.parse_args()
print(f"A={a.A} B={a.B} C={a.C}")
print(f"##muster[metric] name=random_metric value={random.random() * a.C}")
