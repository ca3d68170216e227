# Stand-in for a component's training script (azureml-examples cli/jobs/pipelines-with-components).
import argparse, os
p = argparse.ArgumentParser()
p.add_argument("--training_data")
p.add_argument("--max_epochs", type=int)
p.add_argument("--learning_rate", type=float, default=0.1)
p.add_argument("--model_output")
a = p.parse_args()
rows = sum(len(open(os.path.join(a.training_data, f)).read().splitlines()) for f in os.listdir(a.training_data))
print(f"training on {rows} rows for {a.max_epochs} epochs at {a.learning_rate}")
open(os.path.join(a.model_output, "model.txt"), "w").write(f"rows={rows}\n")
