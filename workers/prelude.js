// IsoBox trusted prelude, evaluated in every fresh context before any untrusted byte.
// QuickJS parses it in every context (about 5 us per function plus ~100 us per KB), so it holds
// only what must exist before user code runs (console, entry) and the finish of primitive
// results, in as few functions as possible. hot.js (globals, object results) and cold.js
// (errors, special values, top-level await, validation) are parsed only by runs that need them.
// It evaluates to one dispatcher the engine keeps; nothing of it is reachable from globalThis.
(function () {
  'use strict';
  const G = globalThis, ev = G.eval, JS = JSON.stringify, JP = JSON.parse, ap = Reflect.apply;
  const P = Promise, then = P.prototype.then, dp = Object.defineProperty, slice = String.prototype.slice;
  const IEP = InternalError.prototype, gp = Object.getPrototypeOf;
  const S = { st: null, unc: null, it: null, nx: null, mode: 'redirect', con: [], n: 0, over: false,
    lim: null, hotSrc: '', coldSrc: '', loopSrc: '', modSrc: '', fsSrc: '', hot: null, cold: null, loop: null, mods: null, memfs: null, fsModule: null,
    violations: [], G, ev, JS, JP, ap, P, dp, gp };
  const H = () => S.hot || (S.hot = ev(S.hotSrc)(S));
  const L = () => S.loop || (S.loop = ev(S.loopSrc)(S, H));
  const MOD = () => S.mods || (S.mods = ev(S.modSrc)(S, H));
  const FS = () => S.memfs || (S.memfs = ev(S.fsSrc)(S));
  S.violation = (type, details) => { S.violations[S.violations.length] = { type, severity: 'high', details }; };
  // QuickJS throws InternalError("out of memory"), or null when it cannot even allocate that;
  // caught here, before any library would have to be parsed in an exhausted heap.
  // No instanceof on thrown values: a Proxy trap or Symbol.hasInstance would run user code here.
  const oom = (e) => {
    if (e === null) return true;
    try { return typeof e === 'object' && gp(e) === IEP && e.message === 'out of memory'; } catch (_) { return false; }
  };
  S.oom = oom;
  // The console is built by hot.js on first touch: runs that never log do not parse it.
  let c = null;
  dp(G, 'console', { configurable: true, get: () => c || (c = H().console()),
    set: (v) => dp(G, 'console', { value: v, writable: true, configurable: true }) });
  // Timers live in loop.js, parsed on first touch like the console.
  for (const k of ['setTimeout', 'setInterval', 'clearTimeout', 'clearInterval', 'queueMicrotask']) {
    dp(G, k, { configurable: true, get: () => L().api[k], set: (v) => dp(G, k, { value: v, writable: true, configurable: true }) });
  }
  S.settle = function settle(v) {
    if (!(v instanceof P)) { S.st = { ok: true, value: v }; return 'D'; }
    ap(then, v, [(x) => { S.st = { ok: true, value: x }; }, (e) => { S.st = { ok: false, error: e }; }]);
    return 'P';
  };
  // If anything the user controls throws past the handlers below, the answer is this constant:
  // no thrown value ever reaches the binding, which would convert it outside the time limit.
  const FAIL = 'E2:[]{"name":"IsoBoxInternal","message":"the sandbox could not report the outcome of this run (hostile values or replaced built-ins)","stack":""}';
  // Concatenations are ropes, which the binding cannot hand to Python: flatten long answers.
  return function isobox(op, a) {
    try { return dispatch(op, a); } catch (_) { return FAIL; }
  };
  function dispatch(op, a) {
    switch (op) {
      case 'setup': case 'run': {
        const cfg = JP(a);
        S.lim = cfg.limits; S.mode = cfg.console;
        S.st = null; S.unc = null; S.con = []; S.n = 0; S.over = false; S.violations = [];
        if (S.loop !== null) S.loop.reset();
        if (cfg.globals !== null || cfg.env !== null) H().setup(cfg);
        if (cfg.fns) L().bind(cfg.fns);
        let entry = null;
        if (cfg.fs) {
          if (S.memfs === null) FS().init(cfg.fs);  // a session keeps its files between runs
          dp(G, '$fs', { value: S.memfs.$fs, writable: true, configurable: true });
          S.fsModule = () => S.memfs.fsModule;
        }
        if (cfg.project || cfg.require || cfg.files || cfg.fs) {
          MOD().setup(cfg);
          if (cfg.project) entry = MOD().entry(cfg.project); else MOD().globalRequire();
        }
        if (op === 'setup') return 'ok';
        let code = cfg.code;
        if (cfg.session) code = L().repl(code);
        try {
          if (cfg.stream) { const r = L().streamStart(code); if (r !== null) return r; }
          const v = ev(code);
          return S.settle(entry !== null && v === undefined ? MOD().exportsOf(entry) : v);
        } catch (e) {
          if (oom(e)) { S.st = { ok: false, error: e }; return 'D'; }
          return H().failed(e, code);
        }
      }
      case 'finish': {
        // Not ready while timers or host calls may still settle it: the engine drives the loop.
        if (S.st === null && S.unc === null && S.loop !== null && S.loop.busy()) return 'L';
        const st = S.st;
        if (S.unc !== null) { S.st = { ok: false, error: S.unc.e }; S.unc = null; return ap(slice, H().finish(), [0]); }
        if (st !== null && st.ok && S.con.length === 0 && !S.over) {
          const v = st.value, t = typeof v;
          if (t === 'boolean' || (t === 'number' && v - v === 0) || (t === 'string' && v.length * 6 < S.lim.result)) {
            return ap(slice, 'R2:[]' + t + '\n' + JS(v), [0]);
          }
          if (v === undefined || v === null) return v === null ? 'R2:[]null\nnull' : 'R2:[]undefined\nnull';
        }
        if (st !== null && !st.ok && oom(st.error)) return 'M2:[]{}';
        return ap(slice, H().finish(), [0]);
      }
      case 'hot': S.hotSrc = a; return 'ok';
      case 'cold': S.coldSrc = a; return 'ok';
      case 'loop': S.loopSrc = a; return 'ok';
      case 'mods': S.modSrc = a; if (a !== '' && S.st === null) MOD(); return 'ok';
      case 'memfs': S.fsSrc = a; return 'ok';
      case 'fsdump': return S.memfs === null ? '{}' : ap(slice, S.memfs.dump(), [0]);
      case 'violations': return S.violations.length ? ap(slice, JS(S.violations), [0]) : '[]';
      default: return ap(slice, op[0] === '.' ? L().op(op, a) : H().op(op, a), [0]);
    }
  }
})()
