# Stand-in for azureml-examples' single-step scripts: reads the same arguments, writes outputs.
import argparse, os, sys
p = argparse.ArgumentParser()
p.add_argument("--data", default=None)
p.add_argument("--labels", default=None)
p.add_argument("--epochs", type=int, default=1)
p.add_argument("--learning-rate", type=float, default=0.1)
p.add_argument("--model-dir", default=None)
p.add_argument("--report", default=None)
a = p.parse_args()
if a.data:
    path = a.data if os.path.isfile(a.data) else os.path.join(a.data, sorted(os.listdir(a.data))[0])
    rows = open(path).read().splitlines()
    print(f"read {len(rows)} rows from {path}")
if a.labels:
    print("labels:", open(a.labels).read().split())
for epoch in range(a.epochs):
    print(f"##muster[metric] name=loss value={1.0 / (epoch + 1) * a.learning_rate} step={epoch}")
if a.model_dir:
    assert os.path.isdir(a.model_dir), "muster makes a uri_folder output before the command"
    open(os.path.join(a.model_dir, "model.txt"), "w").write(f"epochs={a.epochs}\n")
if a.report:
    open(a.report, "w").write("accuracy=0.9\n")
print("done")
