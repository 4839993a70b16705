"""figures/experiments.py renders the Results page's paper-ratio tables from experiments.json's numbers."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("experiments", Path(__file__).parents[1] / "figures" / "experiments.py")
experiments = importlib.util.module_from_spec(spec)
spec.loader.exec_module(experiments)


def test_the_paper_ratio_tables_put_each_methods_numbers_on_its_own_row_with_signed_differences():
    metrics = ["avg@64", "pass@1", "pass@4", "pass@16", "pass@64"]
    value = {"base": 0.05, "grpo": 0.7, "grpo-27": 0.65, "bupo-k5": 0.6, "bupo-k15": 0.5}  # one level per method
    methods = {n: {m: {"mean": [v + i / 1000, v - 0.1, v + 0.1]} for i, m in enumerate(metrics)}
               for n, v in value.items() if n != "base"}
    seed_test = {"sign_flip_p": 0.0625}
    differences = {f"{a} - {b}": {m: {"bootstrap": [value[a] - value[b], -0.25, 0.0125], "seed_test": seed_test}
                                  for m in metrics}
                   for a, b in [("bupo-k5", "grpo"), ("bupo-k15", "grpo"), ("grpo", "grpo-27")]}
    result = {"seeds": 5, "T": 30, "S": 3, "K": [5, 15], "n": 64, "methods": methods, "differences": differences,
              "base": {m: [0.05, 0.04, 0.06] for m in metrics}}

    lines = experiments.paper_ratio_markdown(result).splitlines()

    row = {line.split(" | ")[0].removeprefix("| "): line for line in lines if line.startswith("| ")}
    assert row["base model"] == "| base model | " + " | ".join(["0.050 [0.040, 0.060]"] * 4) + " |"
    assert row["GRPO, T = 30"].startswith("| GRPO, T = 30 | 0.700 [0.600, 0.800] | 0.702 [")  # Avg@64, then pass@4
    assert row["GRPO, T \u2212 S = 27"].startswith("| GRPO, T \u2212 S = 27 | 0.650 [0.550, 0.750] |")
    assert row["BuPO K = 15, S = 3"].endswith("| 0.504 [0.400, 0.600] |")  # pass@64, the last column
    assert row["BuPO K = 5, S = 3 \u2212 GRPO, T = 30"].startswith(
        "| BuPO K = 5, S = 3 \u2212 GRPO, T = 30 | \u22120.100 [\u22120.250, +0.013], p = 0.0625 |")
    assert row["GRPO, T = 30 \u2212 GRPO, T \u2212 S = 27"].split(" | ")[1] == "+0.050 [\u22120.250, +0.013], p = 0.0625"
    assert [line.split(" | ")[0] for line in lines[2:7]] == [  # the methods in the Results page's order
        "| base model", "| GRPO, T = 30", "| GRPO, T \u2212 S = 27", "| BuPO K = 5, S = 3", "| BuPO K = 15, S = 3"]
    assert experiments.paper_ratio_markdown({"seeds": 0}) == ""
