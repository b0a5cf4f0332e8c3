// IsoBox trusted prelude, evaluated in every fresh context before any untrusted byte.
// Parsing JS costs QuickJS about 450 instructions a byte, so this file holds only what must
// exist before user code runs (console, entry) and the finish of primitive results. hot.js
// (setup of globals, object results) and cold.js (errors, special values, top-level await,
// validation) are parsed on demand. It evaluates to one dispatcher that the engine keeps; no
// reference to it stays reachable from globalThis.
(function () {
  'use strict';
  const G = globalThis, ev = G.eval, JS = JSON.stringify, JP = JSON.parse, ap = Reflect.apply;
  const P = Promise, then = P.prototype.then, dp = Object.defineProperty, slice = String.prototype.slice;
  const S = { st: null, mode: 'redirect', con: [], n: 0, over: false, lim: null, hotSrc: '',
    coldSrc: '', hot: null, cold: null, G, ev, JS, JP, ap, P, dp };
  const H = () => S.hot || (S.hot = ev(S.hotSrc)(S));
  function rec(k, a) {
    if (S.mode === 'off' || S.over) return;
    let t = '';
    for (let i = 0; i < a.length; i++) t += (i ? ' ' : '') + (typeof a[i] === 'string' ? a[i] : H().fmt(a[i]));
    S.n += t.length + 16;
    if (S.n > S.lim.console) { S.over = true; S.con = []; } else S.con[S.con.length] = [k, t];
  }
  const c = {};
  for (const k of ['log', 'info', 'warn', 'error', 'debug', 'trace']) c[k] = (...a) => rec(k, a);
  c.dir = (v) => rec('log', [v]);
  dp(G, 'console', { value: c, writable: true, configurable: true });
  S.settle = function settle(v) {
    if (v instanceof P) {
      ap(then, v, [(x) => { S.st = { ok: true, value: x }; }, (e) => { S.st = { ok: false, error: e }; }]);
      return 'P';
    }
    S.st = { ok: true, value: v };
    return 'D';
  };
  // QuickJS throws InternalError("out of memory"), or null when it cannot even allocate that;
  // handled here, before any library would have to be parsed in an exhausted heap.
  const IE = InternalError;
  const oom = (e) => e === null || (e instanceof IE && e.message === 'out of memory');
  function isoboxEntry(code) {
    try { return S.settle(ev(code)); } catch (e) {
      if (oom(e)) { S.st = { ok: false, error: e }; return 'D'; }
      return H().failed(e, code);
    }
  }
  function finish() {
    const st = S.st;
    if (st !== null && !st.ok && oom(st.error)) return 'M2:[]{}';
    if (st !== null && st.ok && S.con.length === 0 && !S.over) {
      const v = st.value, t = typeof v;
      if (t === 'boolean' || (t === 'number' && v - v === 0) || (t === 'string' && v.length * 6 < S.lim.result)) {
        return 'R2:[]' + t + '\n' + JS(v);
      }
      if (v === undefined || v === null) return 'R2:[]' + (v === null ? 'null' : t) + '\nnull';
    }
    return H().finish();
  }
  // Concatenations are ropes, which the binding cannot hand to Python: flatten every answer.
  return function isobox(op, a) { return ap(slice, dispatch(op, a), [0]); };
  function dispatch(op, a) {
    switch (op) {
      case 'start': return isoboxEntry(JP(a));
      case 'finish': return finish();
      case 'setup': {
        const cfg = JP(a);
        S.lim = cfg.limits; S.mode = cfg.console;
        if (cfg.globals !== null || cfg.env !== null) H().setup(cfg);
        return 'ok';
      }
      case 'src': { const s = JP(a); S.hotSrc = s[0]; S.coldSrc = s[1]; return 'ok'; }
      default: return H().op(op, a);
    }
  }
})()
