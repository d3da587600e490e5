"""`tuneforge webui`: a gradio page (Train, Evaluate & Predict, Chat, Export, Runs) in English and
Chinese. It holds no training logic: Start saves the YAML config and runs `tuneforge train` on it
in a subprocess; the other tabs call the workflows the CLI calls.

Files: app.py (page, tabs, language switch, launch), i18n.py (every text in en and zh),
labels.py (relabelling on a language switch), train_tab.py (Train tab layout), train_actions.py
(what its buttons do), options.py (which keys a method or stage shows, from the registry),
command.py (form -> YAML -> `tuneforge train` line, config check), datasets.py (picker and
preview), runner.py (the training subprocess), progress.py (trainer_log.jsonl -> progress, plot),
use.py (config and errors for the other tabs), chat_tab.py, eval_tab.py, export_tab.py, runs_tab.py.
"""

from .app import build_app, launch

__all__ = ["build_app", "launch"]
