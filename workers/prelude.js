// IsoBox trusted prelude, evaluated in every fresh context before any untrusted byte.
// The engine compiles it once per process and reads its bytecode into each context
// (workers/bytecode.py); without bytecode QuickJS parses it in every context (about 5 us per
// function plus ~100 us per KB), so it holds only what must exist before user code runs
// (console, entry) and the finish of primitive results. hot.js (globals, object results),
// cold.js (errors, special values, top-level await, validation) and loop.js (timers, host
// calls, streams, sessions) arrive as factories read from bytecode when the last run used them,
// else as source parsed by the first run that needs them.
// It evaluates to one dispatcher the engine keeps; nothing of it is reachable from globalThis.
(function () {
  'use strict';
  const G = globalThis, ev = G.eval, JS = JSON.stringify, JP = JSON.parse, ap = Reflect.apply;
  const P = Promise, then = P.prototype.then, dp = Object.defineProperty, slice = String.prototype.slice;
  const IEP = InternalError.prototype, gp = Object.getPrototypeOf;
  const S = { st: null, unc: null, it: null, nx: null, mode: 'redirect', con: [], n: 0, over: false,
    lim: null, hotSrc: '', coldSrc: '', loopSrc: '', modSrc: '', fsSrc: '', hot: null, cold: null, loop: null, mods: null, memfs: null, fsModule: null,
    violations: [], G, ev, JS, JP, ap, P, dp, gp, slice };
  // A library arrives as its factory (read from bytecode by the engine) or as its source.
  const lib = (x) => typeof x === 'string' ? ev(x) : x;
  const H = () => S.hot || (S.hot = lib(S.hotSrc)(S));
  const L = () => S.loop || (S.loop = lib(S.loopSrc)(S, H));
  const MOD = () => S.mods || (S.mods = lib(S.modSrc)(S, H));
  const FS = () => S.memfs || (S.memfs = lib(S.fsSrc)(S));
  S.H = H; S.L = L; S.MOD = MOD; S.FS = FS; S.lib = lib;
  // Violations are serialised when they happen (hot.js), from primitives, and stored with
  // defineProperty: no setter, toJSON or iterator the script planted can hide one.
  S.keys = Object.keys;
  S.put = (arr, v) => dp(arr, arr.length, { value: v, writable: true, enumerable: true, configurable: true });
  S.violation = (type, details, severity) => H().violation(type, details, severity);
  // Hardening, before any untrusted byte: the error path is frozen, so a script cannot redefine
  // what the conversion of a thrown value reads. What scripts assign in the ordinary course
  // (`this.name = ...` in a subclass, `Sub.prototype.toString = ...`) becomes an accessor
  // whose setter defines an own property on the receiver (the override mistake): all of
  // Error.prototype's, and `name` on the other error prototypes. (Each accessor costs a few
  // microseconds in every context, so no more than that.)
  const E = Error, EP = E.prototype, TP = Symbol.toPrimitive;
  S.Err = E; S.RefErr = ReferenceError; S.srcs = []; S.trapped = [];
  const tame = (o, k, v) => dp(o, k, { configurable: false, enumerable: false, get() { return v; },
    set(x) { if (this === o) throw new TypeError("Cannot assign to read only property '" + String(k) + "'"); dp(this, k, { value: x, writable: true, enumerable: true, configurable: true }); } });
  tame(EP, 'name', EP.name); tame(EP, 'message', EP.message); tame(EP, 'toString', EP.toString);
  tame(EP, 'constructor', E); tame(EP, TP, undefined);
  const errs = [EvalError, RangeError, ReferenceError, SyntaxError, TypeError, URIError, InternalError, AggregateError];
  if (typeof SuppressedError === 'function') errs[errs.length] = SuppressedError;
  for (let i = 0; i < errs.length; i++) {
    const C = errs[i], p = C.prototype;
    tame(p, 'name', p.name);
    Object.freeze(p); Object.freeze(C);
  }
  Object.freeze(EP);
  // Error.prepareStackTrace would run script code inside every error the engine or the prelude
  // creates: it is pinned to undefined and assignments are ignored.
  dp(E, 'prepareStackTrace', { configurable: false, get: undefined, set: Boolean });  // Boolean: a no-op
  dp(E, 'captureStackTrace', { writable: false, configurable: false });
  // Globals built on first touch; a script may assign its own (then a plain property).
  // Every line of code here is compiled in every context: one helper serves them all.
  const lazy = (k, get) => dp(G, k, { configurable: true, get, set: (v) => dp(G, k, { value: v, writable: true, configurable: true, enumerable: true }) });
  // The console (hot.js) and the timers (loop.js): runs that never use them never parse them.
  let c = null;
  lazy('console', () => c || (c = H().console()));
  const T = ['setTimeout', 'setInterval', 'clearTimeout', 'clearInterval', 'queueMicrotask'];
  for (let i = 0; i < 5; i++) lazy(T[i], () => L().api[T[i]]);
  // A WeakRef or a FinalizationRegistry makes garbage collection observable and runs callbacks
  // at arbitrary points: both are replaced (cold.js) by versions the spec allows, a WeakRef that
  // holds its target and a registry whose callbacks never run.
  delete G.WeakRef; delete G.FinalizationRegistry;
  const W = ['WeakRef', 'FinalizationRegistry'];
  for (let i = 0; i < 2; i++) lazy(W[i], () => H().weak()[W[i]]);
  // Node's globals, where the run does not provide them: reading one records a
  // security:violation and throws the ReferenceError the script expects (`typeof` still says
  // "undefined"; cold.js tells the two apart from the caller's position in the source).
  const N = ['process', 'require', 'Buffer', 'global', 'module'];
  for (let i = 0; i < 5; i++) lazy(N[i], function isoboxProbe() { return H().probe(N[i]); });
  // The sources that ran as user code, newest last (a session keeps its recent ones).
  S.src = (t) => (S.put(S.srcs, t), t);
  // QuickJS throws InternalError("out of memory"), or null when it cannot even allocate that;
  // caught here, before any library would have to be parsed in an exhausted heap.
  // No instanceof on thrown values: a Proxy trap or Symbol.hasInstance would run user code here.
  const oom = (e) => {
    if (e === null) return true;
    try { return typeof e === 'object' && gp(e) === IEP && e.message === 'out of memory'; } catch (_) { return false; }
  };
  S.oom = oom;
  S.settle = function settle(v) {
    if (!(v instanceof P)) { S.st = { ok: true, value: v }; return 'D'; }
    ap(then, v, [(x) => { S.st = { ok: true, value: x }; }, (e) => { S.st = { ok: false, error: e }; }]);
    return 'P';
  };
  // If anything the user controls throws past the handlers below, the answer is this constant:
  // no thrown value ever reaches the binding, which would convert it outside the time limit.
  // The setup of runs that bring more than code. A string until a run needs it: every
  // function of the prelude is created in every context (read from bytecode, or parsed), but
  // a string costs only its copy.
  let rare = null;
  const RARE = `(function (S) {
    const { G, dp } = S;
    return function setup(cfg) {
      if (S.srcs.length > 32) {  // a long session keeps its recent sources only
        const b = [];
        for (let i = S.srcs.length - 32; i < S.srcs.length; i++) S.put(b, S.srcs[i]);
        S.srcs = b;
      }
      if (cfg.globals !== null || cfg.env !== null) S.H().setup(cfg);
      if (cfg.fns) S.L().bind(cfg.fns);
      let entry = null;
      if (cfg.fs) {
        if (S.memfs === null) S.FS().init(cfg.fs);  // a session keeps its files between runs
        dp(G, '$fs', { value: S.memfs.$fs, writable: true, configurable: true });
        S.fsModule = () => S.memfs.fsModule;
      }
      if (cfg.project || cfg.require || cfg.files || cfg.fs) {
        S.MOD().setup(cfg);
        if (cfg.project) entry = S.MOD().entry(cfg.project); else S.MOD().globalRequire();
      }
      return entry;
    };
  })`;
  const FAIL = 'E2:[]{"name":"IsoBoxInternal","message":"the sandbox could not report the outcome of this run (hostile values or replaced built-ins)","stack":""}';
  // Concatenations are ropes, which the binding cannot hand to Python: flatten long answers.
  // Out of memory (say, while parsing a library on first use) is the one failure the engine
  // must tell apart: it answers any call with the memory-limit outcome.
  return function isobox(op, a) {
    try { return dispatch(op, a); } catch (e) { return oom(e) ? 'M2:[]{}' : FAIL; }
  };
  function finish() {
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
  function dispatch(op, a) {
    switch (op) {
      case 'setup': case 'run': {
        const cfg = JP(a);
        S.lim = cfg.limits; S.mode = cfg.console;
        S.st = null; S.unc = null; S.con = []; S.n = 0; S.over = false; S.violations = [];
        if (S.loop !== null) S.loop.reset();
        // Globals, env, host functions, MemFS, modules, a session's sources: compiled from
        // RARE on first need, so plain runs do not pay for it.
        const entry = cfg.globals !== null || cfg.env !== null || cfg.fns || cfg.fs || cfg.project
          || cfg.require || cfg.files || S.srcs.length > 32 ? (rare || (rare = ev(RARE)(S)))(cfg) : null;
        if (op === 'setup') return 'ok';
        let code = cfg.code;
        if (cfg.session) code = L().repl(code);
        try {
          if (cfg.stream) { const r = L().streamStart(code); if (r !== null) return r; }
          const v = ev(S.src(code));
          return S.settle(entry !== null && v === undefined ? MOD().exportsOf(entry) : v);
        } catch (e) {
          if (oom(e)) { S.st = { ok: false, error: e }; return 'D'; }
          return H().failed(e, code);
        }
      }
      case 'finish': {
        // A run that recorded security violations says so with a leading '!': the engine
        // fetches them only then.
        const t = finish();
        return S.violations.length === 0 || t === 'L' ? t : ap(slice, '!' + t, [0]);
      }
      // Polled while promise jobs run: no library is parsed for it (that could be the
      // allocation that fails in an exhausted heap), and without hot.js nothing was logged.
      case 'console': return S.hot === null ? '[]' : ap(slice, S.hot.takeCon(), [0]);
      case 'hot': S.hotSrc = a; return 'ok';
      case 'cold': S.coldSrc = a; return 'ok';
      case 'loop': S.loopSrc = a; return 'ok';
      case 'mods': S.modSrc = a; if (a !== '' && S.st === null) MOD(); return 'ok';
      case 'memfs': S.fsSrc = a; return 'ok';
      case 'libs': return (S.hot === null ? '' : 'h') + (S.cold === null ? '' : 'c') + (S.loop === null ? '' : 'l');
      default: return ap(slice, op[0] === '.' ? L().op(op, a) : H().op(op, a), [0]);
    }
  }
})()
