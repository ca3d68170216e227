# Stand-in for a data-preparation component: copies the rows it can read.
import argparse, os
p = argparse.ArgumentParser()
p.add_argument("--raw_data")
p.add_argument("--prep_data")
a = p.parse_args()
for f in os.listdir(a.raw_data):
    lines = open(os.path.join(a.raw_data, f)).read().splitlines()
    open(os.path.join(a.prep_data, f), "w").write("\n".join(lines[1:]) + "\n")
    print(f"prepared {len(lines) - 1} rows of {f}")
