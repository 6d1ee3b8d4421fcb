"""A small OpenAI-compatible HTTP server over a local HF causal LM (for regeneration and tests).

Implements POST /v1/chat/completions (non-streaming; messages, temperature, top_p, max_tokens, seed) and
GET /v1/models.  Generation runs one request at a time under a lock; the HTTP side is threaded.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

FIXTURE_MODEL = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-chat-llama")  # the embedded default target


@dataclass
class ServeConfig:
    model_path: str = FIXTURE_MODEL
    model_name: str = ""           # reported by /v1/models; "" -> the directory name
    host: str = "127.0.0.1"
    port: int = 8000               # 0 -> an ephemeral port
    dtype: str = "float32"
    device: str = "cpu"
    max_tokens_limit: int = 4096   # cap on a request's max_tokens


class ChatModel:
    def __init__(self, cfg: ServeConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.name = cfg.model_name or cfg.model_path.rstrip("/").split("/")[-1]
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=getattr(torch, cfg.dtype))
        self.model.to(cfg.device).eval()
        self.lock = threading.Lock()

    def chat(self, request: dict) -> dict:
        import torch

        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        max_tokens = int(request.get("max_tokens") or request.get("max_completion_tokens") or 256)
        max_tokens = max(1, min(max_tokens, self.cfg.max_tokens_limit))
        temperature = float(request.get("temperature", 1.0))
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
        input_ids = prompt["input_ids"].to(self.cfg.device)
        kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_tokens,
                  "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": self.tokenizer.eos_token_id}
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=float(request.get("top_p", 1.0)), top_k=0)
        with self.lock, torch.no_grad():
            if request.get("seed") is not None:
                torch.manual_seed(int(request["seed"]))
            output = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        new_tokens = output[0, input_ids.shape[1]:].tolist()
        finished = bool(new_tokens) and new_tokens[-1] == self.tokenizer.eos_token_id
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop" if finished else "length"}],
                "usage": {"prompt_tokens": input_ids.shape[1], "completion_tokens": len(new_tokens),
                          "total_tokens": input_ids.shape[1] + len(new_tokens)}}


def _handler(model: ChatModel):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test and regen output quiet
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model.name, "object": "model",
                                                             "owned_by": "aerie"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if request.get("stream"):
                    raise ValueError("streaming is not supported")
                self._send(200, model.chat(request))
            except (ValueError, TypeError, KeyError) as e:
                self._send(400, {"error": {"message": str(e), "type": "invalid_request_error"}})

    return Handler


def make_server(cfg: ServeConfig, model: Optional[ChatModel] = None) -> ThreadingHTTPServer:
    """A bound (not yet serving) server; server.server_address gives the port when cfg.port is 0."""
    server = ThreadingHTTPServer((cfg.host, cfg.port), _handler(model or ChatModel(cfg)))
    server.daemon_threads = True
    return server


def serve(cfg: ServeConfig) -> None:
    server = make_server(cfg)
    host, port = server.server_address[:2]
    print(f"serving {cfg.model_path} on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
