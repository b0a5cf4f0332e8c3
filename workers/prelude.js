// IsoBox trusted prelude, evaluated in every fresh context before any untrusted byte.
// Kept small: parsing it is on every context's creation. It captures the intrinsics the host's
// conversions rely on, installs a buffered console, and evaluates to one dispatcher function
// that the engine keeps (nothing of it stays reachable from globalThis). Rare work (errors,
// tagged inputs, top-level await) lives in library.js, parsed only when a run needs it.
(function () {
  'use strict';
  const G = globalThis, ev = G.eval, JS = JSON.stringify, JP = JSON.parse, ap = Reflect.apply;
  const isArr = Array.isArray, isView = ArrayBuffer.isView, hasOwn = Object.hasOwn;
  const defProp = Object.defineProperty, P = Promise, then = P.prototype.then, D = Date;
  const getTime = D.prototype.getTime, dToJSON = D.prototype.toJSON, AB = ArrayBuffer;
  const K = { G, ev, JS, JP, ap, isArr, isView, hasOwn, defProp, D, AB,
    keys: Object.keys, entries: Object.entries, fromEntries: Object.fromEntries, freeze: Object.freeze,
    U8: Uint8Array, b64: Uint8Array.prototype.toBase64, fromB64: Uint8Array.fromBase64,
    big: BigInt, bigStr: BigInt.prototype.toString, M: Map, S: Set, aFrom: Array.from,
    mapEntries: Map.prototype.entries, setValues: Set.prototype.values, Err: Error,
    SynErr: SyntaxError, TypeErr: TypeError, RangeErr: RangeError, Str: String,
    slice: String.prototype.slice, split: String.prototype.split, indexOf: String.prototype.indexOf,
    push: Array.prototype.push, reExec: RegExp.prototype.exec,
    AsyncFn: (async function () {}).constructor };
  const T = '$isobox';
  class Tag { #b; constructor(t, v) { this[T] = t; this.v = v; } static is(o) { return #b in o; } }
  K.Tag = Tag;
  let lib = null, libSrc = '', st = null, conv = false, conMode = 'redirect', con = [], conN = 0, conOver = false;
  let lim = { result: 16777216, console: 1048576, error: 65536 };
  const L = () => lib || (lib = ev(libSrc)(K, lim));
  defProp(D.prototype, 'toJSON', { value: function toJSON(k) {
    return conv && this instanceof D ? new Tag('date', ap(getTime, this, [])) : ap(dToJSON, this, [k]);
  } });
  function rep(k, v) {
    switch (typeof v) {
      case 'number': return v === v && v !== 1 / 0 && v !== -1 / 0 ? v : new Tag('num', v !== v ? 'NaN' : v > 0 ? 'Infinity' : '-Infinity');
      case 'string': case 'boolean': return v;
      case 'undefined': return null;
      case 'object': return v === null || isArr(v) || Tag.is(v) ? v : L().special(v);
      default: return L().scalar(v);
    }
  }
  function enc(v) { conv = true; try { return JS(v, rep); } finally { conv = false; } }
  K.enc = enc;
  function rec(kind, args) {
    if (conMode === 'off' || conOver) return;
    let t = '';
    for (let i = 0; i < args.length; i++) t += (i ? ' ' : '') + (typeof args[i] === 'string' ? args[i] : L().fmt(args[i]));
    conN += t.length + 16;
    if (conN > lim.console) { conOver = true; con = []; return; }
    con[con.length] = [kind, t];
  }
  const c = {};
  for (const k of ['log', 'info', 'warn', 'error', 'debug', 'trace']) c[k] = function (...a) { rec(k, a); };
  c.dir = function (v) { rec('log', [v]); };
  defProp(G, 'console', { value: c, writable: true, configurable: true });
  for (const n of ['require', 'process', 'Buffer', 'std', 'os', 'module', 'exports', 'global']) delete G[n];
  function settle(v) {
    if (v instanceof P) {
      ap(then, v, [(x) => { st = { ok: true, value: x }; }, (e) => { st = { ok: false, error: e }; }]);
      return 'P';
    }
    st = { ok: true, value: v };
    return 'D';
  }
  function isoboxEntry(code) {
    try { return settle(ev(code)); } catch (e) { return L().failed(e, code, settle, (s) => { st = s; }); }
  }
  function takeCon() { if (conOver) return '"overflow"'; if (!con.length) return '[]'; const o = JS(con); con = []; return o; }
  function finish() {
    const cj = takeCon(), h = (k, p) => k + cj.length + ':' + cj + p;
    if (st !== null && st.ok) {
      let t;
      try { t = enc(st.value); } catch (e) { const f = L().encodeFailure(e, st.value); return h(f[0], f[1]); }
      if (t === undefined) t = 'null';
      return t.length > lim.result ? h('S', L().tooLarge(t.length)) : h('R', t);
    }
    const r = L().failure(st);
    return h(r[0], r[1]);
  }
  return function isobox(op, arg) {
    switch (op) {
      case 'setup': {
        const cfg = JP(arg);
        lim = cfg.limits; conMode = cfg.console;
        if (cfg.globals !== null) {
          const g = cfg.tagged ? L().revive(cfg.globals) : cfg.globals;
          for (const k of K.keys(g)) defProp(G, k, { value: g[k], writable: true, configurable: true, enumerable: true });
        }
        if (cfg.env !== null) defProp(G, 'process', { value: K.freeze({ env: K.freeze(cfg.env) }) });
        return 'ok';
      }
      case 'start': return isoboxEntry(JP(arg));
      case 'finish': return finish();
      case 'console': return takeCon();
      case 'lib': libSrc = arg; return 'ok';
    }
  };
})()
