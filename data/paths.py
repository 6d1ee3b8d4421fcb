"""Where the checkout's own files are: the repository root and what lives in it (conf/, launch/, assets/)."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
SERVE_SCRIPT = REPO_ROOT / "launch" / "vllm" / "serve.sh"
TINY_TARGET = REPO_ROOT / "assets" / "tiny-chat-llama"
