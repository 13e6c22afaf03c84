"""
A scripted OpenAI-compatible chat-completions server on 127.0.0.1 for the agent's tests (offline). Each POST to
/v1/chat/completions takes the next step of the script:

    "text"                                  a 200 reply with that content
    {"tool": {...}}                         a 200 reply with a propose_edit tool call of those arguments
    {"status": 500, "headers": {...}}       an error reply
    {"sleep": 3, "then": step}              answer `step` after sleeping (longer than the client's timeout)

Past the end of the script it answers HTTP 400 "script exhausted", which the agent treats as fatal, so a test
that asks more than expected fails loudly. Every request body is kept in `requests` (with its arrival time).

Also a command, for trying `autoresearch agent` by hand: python tests/scripted_openai.py SCRIPT.json [PORT]
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ScriptedServer:
    def __init__(self, script, port=0):
        self.script, self.requests, self.lock = list(script), [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with server.lock:
                    server.requests.append({"time": time.monotonic(), "body": body, "path": self.path})
                    step = server.script.pop(0) if server.script else {"status": 400, "message": "script exhausted"}
                try:
                    self.answer(step, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def answer(self, step, body):
                while isinstance(step, dict) and "sleep" in step:
                    time.sleep(step["sleep"])
                    step = step["then"]
                if isinstance(step, dict) and "status" in step:
                    payload = {"error": {"message": step.get("message", f"scripted {step['status']}"),
                                         "type": "scripted"}}
                    self.send(step["status"], payload, step.get("headers", {}))
                    return
                message = {"role": "assistant", "content": step if isinstance(step, str) else None}
                if isinstance(step, dict) and "tool" in step:
                    message["tool_calls"] = [{"id": "call_1", "type": "function", "function": {
                        "name": "propose_edit", "arguments": json.dumps(step["tool"])}}]
                prompt = sum(len(m.get("content") or "") for m in body.get("messages", [])) // 4
                completion = len(message["content"] or "") // 4 + 1
                self.send(200, {"id": "chatcmpl-scripted", "object": "chat.completion", "created": int(time.time()),
                                "model": body.get("model", "scripted"),
                                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                          "total_tokens": prompt + completion}})

            def send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def last_user_message(self, i):
        return self.requests[i]["body"]["messages"][-1]["content"]


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        steps = json.load(f)
    with ScriptedServer(steps, int(sys.argv[2]) if len(sys.argv) > 2 else 0) as s:
        print(f"serving {len(steps)} scripted replies at {s.url}", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
