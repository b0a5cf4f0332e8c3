// IsoBox trusted library, part 5: MemFS, an in-memory filesystem with a byte quota and
// read-only prefixes, exposed as `$fs` and as a synchronous Node-style `fs` module. Parsed only
// by runs with the filesystem enabled. Paths are normalized and clamped to the virtual root;
// a path that tries to climb above it, a write under a read-only prefix and a write over the
// quota are security violations. Text is kept as strings, binary as Uint8Array; sizes count
// UTF-8 bytes.
(function (S) {
  'use strict';
  const { ap, dp } = S;
  const M = Map, U8 = Uint8Array, AB = ArrayBuffer, isView = ArrayBuffer.isView;
  const split = String.prototype.split, join = Array.prototype.join, startsWith = String.prototype.startsWith;
  const charCodeAt = String.prototype.charCodeAt, fromCharCode = String.fromCharCode;
  const b64 = Uint8Array.prototype.toBase64, fromB64 = Uint8Array.fromBase64, now = Date.now;
  let files = new M(), dirs = new Set(['/']), used = 0, quota = 0, readOnly = [];

  // -- UTF-8 (no TextEncoder in QuickJS); lone surrogates become U+FFFD, as in Node --------
  function utf8Length(s) {
    let n = 0;
    for (let i = 0; i < s.length; i++) {
      const c = ap(charCodeAt, s, [i]);
      if (c < 0x80) n += 1; else if (c < 0x800) n += 2;
      else if (c >= 0xd800 && c < 0xdc00 && i + 1 < s.length && (ap(charCodeAt, s, [i + 1]) & 0xfc00) === 0xdc00) { n += 4; i++; } else n += 3;
    }
    return n;
  }
  function encode(s) {
    const out = new U8(utf8Length(s));
    let j = 0;
    for (let i = 0; i < s.length; i++) {
      let c = ap(charCodeAt, s, [i]);
      if (c >= 0xd800 && c < 0xdc00 && i + 1 < s.length && (ap(charCodeAt, s, [i + 1]) & 0xfc00) === 0xdc00) {
        c = 0x10000 + ((c - 0xd800) << 10) + (ap(charCodeAt, s, [++i]) - 0xdc00);
        out[j++] = 0xf0 | (c >> 18); out[j++] = 0x80 | ((c >> 12) & 63); out[j++] = 0x80 | ((c >> 6) & 63); out[j++] = 0x80 | (c & 63);
      } else {
        if (c >= 0xd800 && c < 0xe000) c = 0xfffd;
        if (c < 0x80) out[j++] = c;
        else if (c < 0x800) { out[j++] = 0xc0 | (c >> 6); out[j++] = 0x80 | (c & 63); }
        else { out[j++] = 0xe0 | (c >> 12); out[j++] = 0x80 | ((c >> 6) & 63); out[j++] = 0x80 | (c & 63); }
      }
    }
    return out;
  }
  function decode(b) {
    let s = '';
    for (let i = 0; i < b.length;) {
      const c = b[i];
      let cp = 0xfffd, n = 1;
      if (c < 0x80) cp = c;
      else if (c >= 0xc2 && c < 0xe0 && i + 1 < b.length) { cp = ((c & 31) << 6) | (b[i + 1] & 63); n = 2; }
      else if (c >= 0xe0 && c < 0xf0 && i + 2 < b.length) { cp = ((c & 15) << 12) | ((b[i + 1] & 63) << 6) | (b[i + 2] & 63); n = 3; }
      else if (c >= 0xf0 && c < 0xf5 && i + 3 < b.length) { cp = ((c & 7) << 18) | ((b[i + 1] & 63) << 12) | ((b[i + 2] & 63) << 6) | (b[i + 3] & 63); n = 4; }
      if (cp > 0xffff) { cp -= 0x10000; s += fromCharCode(0xd800 + (cp >> 10), 0xdc00 + (cp & 1023)); } else s += fromCharCode(cp);
      i += n;
    }
    return s;
  }
  const size = (d) => (typeof d === 'string' ? utf8Length(d) : d.length);

  // -- paths and errors ----------------------------------------------------------------------
  function isoboxModFsError(code, what, syscall, path) {
    const e = new Error(code + ': ' + what + ', ' + syscall + " '" + path + "'");
    e.code = code; e.syscall = syscall; e.path = path;
    return e;
  }
  function isoboxModNorm(p, syscall) {
    if (typeof p !== 'string') throw new TypeError('The "path" argument must be of type string');
    const out = [];
    const parts = ap(split, p, ['/']);
    let climbed = false;
    for (let i = 0; i < parts.length; i++) {
      const s = parts[i];
      if (s === '' || s === '.') continue;
      if (s === '..') { if (out.length) out.length--; else climbed = true; continue; }
      out[out.length] = s;
    }
    const full = '/' + ap(join, out, ['/']);
    if (climbed) S.violation('path_traversal', { path: p, operation: syscall, resolved: full });
    return full;
  }
  const parent = (p) => { const i = p.lastIndexOf('/'); return i <= 0 ? '/' : p.slice(0, i); };
  function isoboxModWritable(p, syscall) {
    for (let i = 0; i < readOnly.length; i++) {
      const r = readOnly[i];
      if (p === r || ap(startsWith, p, [r === '/' ? '/' : r + '/'])) {
        S.violation('read_only_write', { path: p, operation: syscall });
        throw isoboxModFsError('EACCES', 'permission denied', syscall, p);
      }
    }
  }
  function isoboxModCharge(delta, p, syscall) {
    if (used + delta > quota) {
      S.violation('quota_exceeded', { path: p, operation: syscall, quota, used, requested: delta });
      throw isoboxModFsError('ENOSPC', 'no space left on device (quota of ' + quota + ' bytes)', syscall, p);
    }
    used += delta;
  }
  function data(x) {
    if (typeof x === 'string') return x;
    if (x instanceof AB) return new U8(x.slice(0));
    if (isView(x)) return new U8(x.buffer.slice(x.byteOffset, x.byteOffset + x.byteLength));
    throw new TypeError('The "data" argument must be a string, a typed array or an ArrayBuffer');
  }

  // -- operations (Node semantics; $fs adds conveniences on top) -----------------------------
  function isoboxModReadFile(path, encoding) {
    const p = isoboxModNorm(path, 'open');
    if (dirs.has(p)) throw isoboxModFsError('EISDIR', 'illegal operation on a directory', 'read', p);
    const f = files.get(p);
    if (f === undefined) throw isoboxModFsError('ENOENT', 'no such file or directory', 'open', p);
    const text = encoding === 'utf8' || encoding === 'utf-8';
    if (text) return typeof f.d === 'string' ? f.d : decode(f.d);
    return typeof f.d === 'string' ? encode(f.d) : new U8(f.d);
  }
  function isoboxModWriteFile(path, x, append, makeParents) {
    const syscall = append ? 'appendFile' : 'open';
    const p = isoboxModNorm(path, syscall);
    if (dirs.has(p)) throw isoboxModFsError('EISDIR', 'illegal operation on a directory', syscall, p);
    isoboxModWritable(p, syscall);
    if (!dirs.has(parent(p))) {
      if (!makeParents) throw isoboxModFsError('ENOENT', 'no such file or directory', syscall, p);
      isoboxModMkdir(parent(p), true);
    }
    let d = data(x);
    const old = files.get(p);
    if (append && old !== undefined) {
      d = typeof old.d === 'string' && typeof d === 'string' ? old.d + d : isoboxModConcat(old.d, d);
    }
    isoboxModCharge(size(d) - (old === undefined ? 0 : size(old.d)), p, syscall);
    files.set(p, { d, m: now() });
  }
  function isoboxModConcat(a, b) {
    const x = typeof a === 'string' ? encode(a) : a, y = typeof b === 'string' ? encode(b) : b;
    const out = new U8(x.length + y.length);
    out.set(x, 0); out.set(y, x.length);
    return out;
  }
  function isoboxModMkdir(path, recursive) {
    const p = isoboxModNorm(path, 'mkdir');
    if (dirs.has(p)) { if (recursive) return; throw isoboxModFsError('EEXIST', 'file already exists', 'mkdir', p); }
    if (files.has(p)) throw isoboxModFsError('EEXIST', 'file already exists', 'mkdir', p);
    isoboxModWritable(p, 'mkdir');
    if (!dirs.has(parent(p))) {
      if (!recursive) throw isoboxModFsError('ENOENT', 'no such file or directory', 'mkdir', p);
      isoboxModMkdir(parent(p), true);
    }
    dirs.add(p);
  }
  function isoboxModChildren(p) {
    const pre = p === '/' ? '/' : p + '/', out = new Set();
    for (const k of files.keys()) if (ap(startsWith, k, [pre])) out.add(ap(split, k.slice(pre.length), ['/'])[0]);
    for (const k of dirs) if (k !== p && ap(startsWith, k, [pre])) out.add(ap(split, k.slice(pre.length), ['/'])[0]);
    return [...out].sort();
  }
  function isoboxModReaddir(path) {
    const p = isoboxModNorm(path, 'scandir');
    if (files.has(p)) throw isoboxModFsError('ENOTDIR', 'not a directory', 'scandir', p);
    if (!dirs.has(p)) throw isoboxModFsError('ENOENT', 'no such file or directory', 'scandir', p);
    return isoboxModChildren(p);
  }
  function isoboxModRemove(path, recursive, force, syscall) {
    const p = isoboxModNorm(path, syscall);
    if (files.has(p)) { isoboxModWritable(p, syscall); used -= size(files.get(p).d); files.delete(p); return; }
    if (!dirs.has(p)) { if (force) return; throw isoboxModFsError('ENOENT', 'no such file or directory', syscall, p); }
    if (syscall === 'unlink') throw isoboxModFsError('EISDIR', 'illegal operation on a directory', syscall, p);
    if (p === '/') throw isoboxModFsError('EACCES', 'permission denied', syscall, p);
    isoboxModWritable(p, syscall);
    const kids = isoboxModChildren(p);
    if (kids.length && !recursive) throw isoboxModFsError('ENOTEMPTY', 'directory not empty', syscall, p);
    for (let i = 0; i < kids.length; i++) isoboxModRemove(p + '/' + kids[i], true, true, syscall);
    dirs.delete(p);
  }
  function isoboxModRename(from, to) {
    const a = isoboxModNorm(from, 'rename'), b = isoboxModNorm(to, 'rename');
    if (!files.has(a)) throw isoboxModFsError(dirs.has(a) ? 'EISDIR' : 'ENOENT', dirs.has(a) ? 'illegal operation on a directory' : 'no such file or directory', 'rename', a);
    isoboxModWritable(a, 'rename'); isoboxModWritable(b, 'rename');
    if (dirs.has(b)) throw isoboxModFsError('EISDIR', 'illegal operation on a directory', 'rename', b);
    if (!dirs.has(parent(b))) throw isoboxModFsError('ENOENT', 'no such file or directory', 'rename', b);
    const f = files.get(a), old = files.get(b);
    if (old !== undefined) used -= size(old.d);
    files.delete(a);
    files.set(b, f);
  }
  function isoboxModStat(path) {
    const p = isoboxModNorm(path, 'stat');
    const f = files.get(p);
    if (f === undefined && !dirs.has(p)) throw isoboxModFsError('ENOENT', 'no such file or directory', 'stat', p);
    const isFile = f !== undefined, sz = isFile ? size(f.d) : 0, m = isFile ? f.m : 0;
    return { isFile: () => isFile, isDirectory: () => !isFile, size: sz, mtimeMs: m, mtime: new Date(m) };
  }
  const exists = (path) => { try { const p = isoboxModNorm(path, 'access'); return files.has(p) || dirs.has(p); } catch (_) { return false; } };
  const enc = (o) => (typeof o === 'string' ? o : o && typeof o === 'object' ? o.encoding : undefined);

  const fsModule = Object.freeze({
    readFileSync: (p, o) => isoboxModReadFile(p, enc(o)),
    writeFileSync: (p, d) => isoboxModWriteFile(p, d, false, false),
    appendFileSync: (p, d) => isoboxModWriteFile(p, d, true, false),
    existsSync: exists,
    readdirSync: (p) => isoboxModReaddir(p),
    mkdirSync: (p, o) => { isoboxModMkdir(p, !!(o && o.recursive)); },
    statSync: (p) => isoboxModStat(p),
    unlinkSync: (p) => isoboxModRemove(p, false, false, 'unlink'),
    renameSync: (a, b) => isoboxModRename(a, b),
    rmSync: (p, o) => isoboxModRemove(p, !!(o && o.recursive), !!(o && o.force), 'rm'),
  });
  const $fs = Object.freeze({
    read: (p, encoding) => isoboxModReadFile(p, encoding === undefined ? 'utf8' : encoding),
    write: (p, d) => isoboxModWriteFile(p, d, false, true),
    append: (p, d) => isoboxModWriteFile(p, d, true, true),
    exists,
    list: (p) => isoboxModReaddir(p === undefined ? '/' : p),
    mkdir: (p) => isoboxModMkdir(p, true),
    remove: (p, o) => isoboxModRemove(p, !(o && o.recursive === false), false, 'rm'),
    stat: (p) => { const s = isoboxModStat(p); return { size: s.size, isFile: s.isFile(), isDirectory: s.isDirectory(), mtime: s.mtimeMs }; },
    rename: (a, b) => isoboxModRename(a, b),
  });

  function init(cfg) {
    // First run of a context only: a session keeps its files from run to run.
    quota = cfg.quota; readOnly = [];
    for (let i = 0; i < cfg.readOnly.length; i++) readOnly[i] = isoboxModNorm(cfg.readOnly[i], 'init');
    const ro = readOnly;
    readOnly = [];
    const fs = cfg.files;
    for (const path in fs) {
      const v = fs[path];
      isoboxModWriteFile(path, v[0] === 'b' ? ap(fromB64, U8, [v[1]]) : v[1], false, true);
    }
    readOnly = ro;
  }
  function dump() {
    const out = {};
    for (const [p, f] of files) out[p] = typeof f.d === 'string' ? ['t', f.d] : ['b', ap(b64, f.d, [])];
    return S.JS(out);
  }
  return { init, dump, fsModule, $fs };
})
