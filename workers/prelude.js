// IsoBox trusted prelude, evaluated in every fresh context before any untrusted byte. Parsing it
// is part of every context's cost, so it holds only the hot path: entry, settle, the result
// encoder and a console that buffers. It captures the intrinsics it uses and evaluates to one
// dispatcher the engine keeps; nothing stays reachable from globalThis. Rare work (errors,
// special values, tagged inputs, top-level await, validation) is library.js, parsed on demand.
(function () {
  'use strict';
  const G = globalThis, ev = G.eval, JS = JSON.stringify, JP = JSON.parse, ap = Reflect.apply;
  const isArr = Array.isArray, P = Promise, then = P.prototype.then, defProp = Object.defineProperty;
  const K = { G, ev, JS, JP, ap, isArr, defProp, P, D: Date, getTime: Date.prototype.getTime,
    dToJSON: Date.prototype.toJSON, isView: ArrayBuffer.isView, AB: ArrayBuffer, hasOwn: Object.hasOwn,
    keys: Object.keys, entries: Object.entries, fromEntries: Object.fromEntries, freeze: Object.freeze,
    U8: Uint8Array, b64: Uint8Array.prototype.toBase64, fromB64: Uint8Array.fromBase64, big: BigInt,
    bigStr: BigInt.prototype.toString, M: Map, S: Set, aFrom: Array.from, mapEntries: Map.prototype.entries,
    setValues: Set.prototype.values, Err: Error, SynErr: SyntaxError, TypeErr: TypeError,
    RangeErr: RangeError, Str: String, slice: String.prototype.slice, split: String.prototype.split,
    indexOf: String.prototype.indexOf, reExec: RegExp.prototype.exec, AsyncFn: (async function () {}).constructor };
  let lib = null, src = '', st = null, mode = 'redirect', con = [], conN = 0, over = false, lim = null;
  const L = () => lib || (lib = ev(src)(K, lim));
  const S = { set: (s) => { st = s; } };
  const OP = Object.prototype, proto = Object.getPrototypeOf, getTime = K.getTime, dToJSON = K.dToJSON;
  class Tag { #b; constructor(t, v) { this.$isobox = t; this.v = v; } static is(o) { return #b in o; } }
  K.Tag = Tag;
  let conv = false;
  // Date.prototype.toJSON runs before a replacer sees the value: the one place to tell a Date
  // from a string. Outside our encoder it behaves as standard.
  defProp(K.D.prototype, 'toJSON', { value: function toJSON(k) {
    return conv && this instanceof K.D ? new Tag('date', ap(getTime, this, [])) : ap(dToJSON, this, [k]);
  } });
  function rep(k, v) {
    const t = typeof v;
    if (t === 'string' || t === 'boolean' || (t === 'number' && v - v === 0)) return v;
    if (t === 'undefined') return null;
    if (t === 'object' && (v === null || isArr(v) || Tag.is(v) || (proto(v) === OP && !K.hasOwn(v, '$isobox')))) return v;
    return L().rep(v);
  }
  function enc(v) { conv = true; try { return JS(v, rep); } finally { conv = false; } }
  K.enc = enc;
  function rec(kind, args) {
    if (mode === 'off' || over) return;
    let t = '';
    for (let i = 0; i < args.length; i++) t += (i ? ' ' : '') + (typeof args[i] === 'string' ? args[i] : L().fmt(args[i]));
    conN += t.length + 16;
    if (conN > lim.console) { over = true; con = []; } else con[con.length] = [kind, t];
  }
  const c = {};
  for (const k of ['log', 'info', 'warn', 'error', 'debug', 'trace']) c[k] = (...a) => rec(k, a);
  c.dir = (v) => rec('log', [v]);
  defProp(G, 'console', { value: c, writable: true, configurable: true });
  function settle(v) {
    if (v instanceof P) {
      ap(then, v, [(x) => { st = { ok: true, value: x }; }, (e) => { st = { ok: false, error: e }; }]);
      return 'P';
    }
    st = { ok: true, value: v };
    return 'D';
  }
  function isoboxEntry(code) {
    try { return settle(ev(code)); } catch (e) { return L().failed(e, code, settle, S.set); }
  }
  function takeCon() { if (over) return '"overflow"'; if (!con.length) return '[]'; const o = JS(con); con = []; return o; }
  function finish() {
    const cj = takeCon(), h = (k, p) => k + cj.length + ':' + cj + p;
    if (st === null || !st.ok) { const r = L().failure(st); return h(r[0], r[1]); }
    const v = st.value;
    let t;
    try { t = enc(v); }
    catch (e) { const f = L().encodeFailure(e, v); return h(f[0], f[1]); }
    if (t === undefined) t = 'null';
    if (t.length > lim.result) return h('S', L().tooLarge(t.length));
    return h('R', (v === null ? 'null' : isArr(v) ? 'array' : typeof v !== 'object' ? typeof v : proto(v) === OP ? 'object' : L().kind(v)) + '\n' + t);
  }
  return function isobox(op, arg) {
    switch (op) {
      case 'setup': {
        const cfg = JP(arg);
        lim = cfg.limits; mode = cfg.console;
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
      case 'lib': src = arg; return 'ok';
      case 'validate': return L().validate(JP(arg));
    }
  };
})()
