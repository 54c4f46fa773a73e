"""docs/serving.md's nginx recipe tried on loopback: ``python scripts/nginx_replicas.py WORKDIR``.

Two replicas (``python -m streaming_trt.cli.serve --model builtin:random``, ports 18001/18002) on one
``--session-dir``, nginx on 127.0.0.1:18000 hashing ``X-Session-ID`` (``hash ... consistent``); 8
sessions of 4 turns; after turn 2 the replica serving ``alice-1`` is stopped; every later turn goes
through nginx to the other replica. Prints, per turn, whether the reply equals the same
conversation run in-process (greedy) and what the server fed, then nginx's upstream per request.
Needs nginx on PATH (Debian: ``apt-get install nginx``).
"""
import json, signal, subprocess, sys, time, urllib.request, pathlib, torch
D = pathlib.Path(sys.argv[1]); D.mkdir(parents=True, exist_ok=True)
SINK, WINDOW, TOKENS = 4, 60, 8
ports = {"a": (18101, 18001), "b": (18102, 18002)}
procs = {}
for name, (grpc, http) in ports.items():
    log = open(D / f"{name}.log", "w")
    procs[name] = subprocess.Popen([sys.executable, "-m", "streaming_trt.cli.serve", "--model", "builtin:random",
        "--session-dir", str(D / "sessions"), "--grpc-port", str(grpc), "--openai-port", str(http),
        "--gateway-state-dir", str(D / f"gw-{name}"), "--threads", "1", "--sink-tokens", str(SINK),
        "--window", str(WINDOW)], stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
for name, p in procs.items():
    line = p.stdout.readline(); print(name, line.strip()[:120], flush=True)
conf = f"""pid {D}/nginx.pid; error_log {D}/nginx.err; daemon on;
events {{}}
http {{
  access_log {D}/access.log;
  client_body_temp_path {D}/tmp; proxy_temp_path {D}/tmp; fastcgi_temp_path {D}/tmp; uwsgi_temp_path {D}/tmp; scgi_temp_path {D}/tmp;
  upstream streaming_trt {{
    hash $http_x_session_id consistent;
    server 127.0.0.1:18001 max_fails=1 fail_timeout=10s;
    server 127.0.0.1:18002 max_fails=1 fail_timeout=10s;
  }}
  log_format up '$http_x_session_id $upstream_addr $status';
  server {{
    listen 127.0.0.1:18000;
    access_log {D}/up.log up;
    location /v1/ {{
      proxy_pass http://streaming_trt;
      proxy_set_header Host 127.0.0.1;
      proxy_http_version 1.1;
      proxy_buffering off;
      proxy_read_timeout 300s;
    }}
  }}
}}
"""
(D / "tmp").mkdir(exist_ok=True); (D / "nginx.conf").write_text(conf)
subprocess.run(["nginx", "-c", str(D / "nginx.conf"), "-p", str(D)], check=True)
time.sleep(0.5)

def chat(messages, sid):
    req = urllib.request.Request("http://127.0.0.1:18000/v1/chat/completions",
        data=json.dumps({"messages": messages, "max_tokens": TOKENS}).encode(),
        headers={"Content-Type": "application/json", "X-Session-ID": sid})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())

import streaming_trt as st
from streaming_trt.loading.builtin import builtin_model
from streaming_trt.runtime.chat import Chat
from streaming_trt.runtime.generation import eos_ids
from streaming_trt.runtime.sampling import Sampler, SamplingParams
from streaming_trt.loading.tokenizer import IncrementalDecoder
torch.set_num_threads(1)
model, tok = builtin_model(), st.load_tokenizer("builtin:random")
try:
    results = {}
    for sid in ["alice-1", "bob-2", "carol-3", "dave-4", "erin-5", "frank-6", "grace-7", "heidi-8"]:
        texts = [f"{sid} turn {t} hello there" for t in range(4)]
        conv, session = Chat(tok, eos_ids(tok, model.config)), model.session(SINK, WINDOW)
        want = []
        for t in texts:
            ids = [i for i, _ in conv.reply(session, t, TOKENS, Sampler(SamplingParams(temperature=0.0)))]
            d = IncrementalDecoder(tok); want.append("".join(d.push(i) for i in ids))
        results[sid] = (texts, want, [])
    killed = None
    for turn in range(4):
        if turn == 2:  # stop the replica serving alice-1
            upstream = [l.split()[1] for l in (D / "up.log").read_text().splitlines() if l.startswith("alice-1")][-1]
            killed = "a" if upstream.endswith("18001") else "b"
            procs[killed].send_signal(signal.SIGTERM); procs[killed].wait(60)
            print("stopped replica", killed, "which served alice-1", flush=True)
        for sid, (texts, want, msgs) in results.items():
            msgs.append({"role": "user", "content": texts[turn]})
            r = chat(msgs, sid)
            reply = r["choices"][0]["message"]["content"]
            msgs.append({"role": "assistant", "content": reply})
            print(sid, "turn", turn, "equal" if reply == want[turn] else "DIFFERENT", "prompt_tokens",
                  r["usage"]["prompt_tokens"], flush=True)
    print(open(D / "up.log").read())
    print("sqlite in shared dir:", list((D / "sessions").glob("*.sqlite")))
finally:
    subprocess.run(["nginx", "-c", str(D / "nginx.conf"), "-p", str(D), "-s", "stop"])
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM); p.wait(60)
