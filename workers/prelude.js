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
  const IE = InternalError;
  const S = { st: null, mode: 'redirect', con: [], n: 0, over: false, lim: null, hotSrc: '',
    coldSrc: '', hot: null, cold: null, G, ev, JS, JP, ap, P, dp };
  const H = () => S.hot || (S.hot = ev(S.hotSrc)(S));
  // QuickJS throws InternalError("out of memory"), or null when it cannot even allocate that;
  // caught here, before any library would have to be parsed in an exhausted heap.
  const oom = (e) => e === null || (e instanceof IE && e.message === 'out of memory');
  const c = {};
  for (const k of ['log', 'info', 'warn', 'error', 'debug', 'trace']) {
    c[k] = (...a) => {
      if (S.mode === 'off' || S.over) return;
      let t = '';
      for (let i = 0; i < a.length; i++) t += (i ? ' ' : '') + (typeof a[i] === 'string' ? a[i] : H().fmt(a[i]));
      S.n += t.length + 16;
      if (S.n > S.lim.console) { S.over = true; S.con = []; } else S.con[S.con.length] = [k, t];
    };
  }
  c.dir = c.log;
  dp(G, 'console', { value: c, writable: true, configurable: true });
  S.settle = function settle(v) {
    if (!(v instanceof P)) { S.st = { ok: true, value: v }; return 'D'; }
    ap(then, v, [(x) => { S.st = { ok: true, value: x }; }, (e) => { S.st = { ok: false, error: e }; }]);
    return 'P';
  };
  // Concatenations are ropes, which the binding cannot hand to Python: flatten long answers.
  return function isobox(op, a) {
    switch (op) {
      case 'setup': case 'run': {
        const cfg = JP(a);
        S.lim = cfg.limits; S.mode = cfg.console;
        if (cfg.globals !== null || cfg.env !== null) H().setup(cfg);
        if (op === 'setup') return 'ok';
        const code = cfg.code;
        try { return S.settle(ev(code)); } catch (e) {
          if (oom(e)) { S.st = { ok: false, error: e }; return 'D'; }
          return H().failed(e, code);
        }
      }
      case 'finish': {
        const st = S.st;
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
      default: return ap(slice, H().op(op, a), [0]);
    }
  };
})()
