"""A tour of IsoBox on its embedded defaults: values, console, errors, limits, streams,
sessions, host functions, timers and pool figures."""

from __future__ import annotations

import isobox
from isobox import IsoBox


def main() -> None:
    """Run a handful of snippets in supervised workers and print what comes back."""
    with IsoBox(timeout=2.0, memory_limit=32 * 2**20, pool={"min": 2, "max": 2}) as box:
        box.warmup_pool()
        show = [
            ("1 + 2", "1 + 2", None),
            ("map over sandbox data", "data.map(x => x * 2)", {"data": [1, 2, 3]}),
            ("BigInt, Date, bytes", "[2n ** 64n, new Date(0), new Uint8Array([1, 2])]", None),
            ("top-level await", "const v = await Promise.resolve(20); v * 2", None),
        ]
        for label, code, sandbox in show:
            print(f"{label:<22} ->", box.run(code, sandbox=sandbox))
        result = box.execute("console.log('hello from the sandbox'); 42")
        print("console                ->", result.console, "value", result.value,
              f"({result.duration * 1e3:.2f} ms on worker {result.worker_pid})")
        for label, code in [("thrown error", "throw new TypeError('bad input')"),
                            ("syntax error", "let x = ;"),
                            ("endless loop", "while (true) {}"),
                            ("memory bomb", "const a = []; for (;;) a.push('x'.repeat(1e4))"),
                            ("function result", "({f() {}})")]:
            try:
                box.run(code, timeout=0.2 if label == "endless loop" else 1.0)
            except isobox.IsoBoxError as exc:
                print(f"{label:<22} -> {type(exc).__name__}: {exc}")
        stream = box.run_stream("for (let i = 0; i < 5; i++) yield i * 2")
        print("run_stream             ->", list(stream))
        print("host function + timer  ->", box.run(
            "new Promise(r => setTimeout(() => r(lookup('ada')), 20))",
            functions={"lookup": lambda name: {"name": name, "admin": True}}))
        with box.create_session("demo", ttl=60) as session:
            session.run("let counter = 0; const greet = (n) => 'hi ' + n")
            session.run("counter++")
            print("session                ->", session.run("counter++; greet(counter)"),
                  "state", session.get_state())
        box.warmup_pool()
        for worker in box.pool_stats().workers:
            print(f"worker {worker.pid}: {worker.state}, rss {worker.rss / 2**20:.1f} MiB, "
                  f"uss {worker.uss / 2**20:.1f} MiB, {worker.runs} runs")
        metrics = box.get_metrics()
        print(f"runs {metrics.total_executions}, errors {metrics.errors}, "
              f"p50 {metrics.p50_duration * 1e3:.2f} ms, restarts {metrics.worker_restarts}")


if __name__ == "__main__":
    main()
