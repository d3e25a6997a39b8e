/**
 * Where receivers may live. Workers POST signed events to receivers' URLs, so a URL must not reach
 * a cloud metadata service, the worker's own host or a private network unless the operator says
 * so. URLs are checked when a receiver is added, and the resolved addresses again at every attempt
 * (DNS rebinding): the connection is then made to exactly the addresses checked.
 */
import type { LookupAddress } from 'node:dns';
import { lookup } from 'node:dns/promises';
import { BlockList, isIP, type LookupFunction } from 'node:net';
import { codePoint } from './validation.js';

/** Address ranges refused by default that TOKENWARDEN_RECEIVER_ALLOW can open. */
export const RECEIVER_ALLOWANCES = ['loopback', 'private'] as const;
export type ReceiverAllowance = (typeof RECEIVER_ALLOWANCES)[number];

/** Receivers' URLs are stored, shown and sent with every attempt's log line: keep them short. */
export const MAX_RECEIVER_URL_LENGTH = 2048;

/** Link-local, metadata, unspecified, multicast and reserved ranges: no receiver lives there. */
const NEVER = new BlockList();
NEVER.addSubnet('0.0.0.0', 8, 'ipv4'); // "this network": 0.0.0.0 reaches the local host
NEVER.addSubnet('169.254.0.0', 16, 'ipv4'); // link-local, where clouds serve instance metadata
NEVER.addAddress('100.100.100.200', 'ipv4'); // Alibaba Cloud's metadata service
NEVER.addSubnet('192.0.0.0', 24, 'ipv4'); // IETF protocol assignments (gateways' own services)
NEVER.addSubnet('198.18.0.0', 15, 'ipv4'); // benchmarking
NEVER.addSubnet('224.0.0.0', 4, 'ipv4'); // multicast
NEVER.addSubnet('240.0.0.0', 4, 'ipv4'); // reserved, and the broadcast address
NEVER.addAddress('::', 'ipv6');
NEVER.addSubnet('fe80::', 10, 'ipv6'); // link-local
NEVER.addSubnet('2001::', 32, 'ipv6'); // Teredo: tunnels to an IPv4 host its obfuscated client field names
NEVER.addAddress('fd00:ec2::254', 'ipv6'); // AWS's metadata service over IPv6
NEVER.addSubnet('ff00::', 8, 'ipv6'); // multicast

const LOOPBACK = new BlockList();
LOOPBACK.addSubnet('127.0.0.0', 8, 'ipv4');
LOOPBACK.addAddress('::1', 'ipv6');

/** A host to listen on that only this machine reaches: `localhost`, 127.0.0.0/8 or ::1. */
export function isLoopbackHost(host: string): boolean {
  if (host === 'localhost') return true;
  const family = isIP(host);
  return family !== 0 && LOOPBACK.check(host, family === 4 ? 'ipv4' : 'ipv6');
}

const PRIVATE = new BlockList();
PRIVATE.addSubnet('10.0.0.0', 8, 'ipv4');
PRIVATE.addSubnet('172.16.0.0', 12, 'ipv4');
PRIVATE.addSubnet('192.168.0.0', 16, 'ipv4');
PRIVATE.addSubnet('100.64.0.0', 10, 'ipv4'); // carrier-grade NAT
PRIVATE.addSubnet('fc00::', 7, 'ipv6'); // unique local
PRIVATE.addSubnet('fec0::', 10, 'ipv6'); // site-local: deprecated, still routed inside some sites

/** Names of metadata services, whatever they resolve to from where the check runs. */
const METADATA_NAMES = [
  'metadata',
  'metadata.google.internal',
  'metadata.goog',
  'metadata.azure.com',
  'metadata.azure.internal',
  'instance-data',
  'instance-data.ec2.internal',
];

/**
 * The IPv4 address an IPv6 address carries, for the forms that reach an IPv4 host: mapped
 * (::ffff:a.b.c.d), translated (::ffff:0:a.b.c.d), compatible (::a.b.c.d), NAT64 (well-known
 * 64:ff9b::/96 and local-use 64:ff9b:1::/48, both read as /96 prefixes) and 6to4 (2002:AABB:CCDD::/48).
 */
export function embeddedIPv4(ipv6: string): string | undefined {
  const bytes = ipv6Bytes(ipv6);
  if (!bytes) return undefined;
  const quad = (at: number) => [...bytes.subarray(at, at + 4)].join('.');
  const zero = (from: number, to: number) => bytes.subarray(from, to).every((b) => b === 0);
  if (zero(0, 10) && bytes[10] === 0xff && bytes[11] === 0xff) return quad(12);
  if (zero(0, 8) && bytes[8] === 0xff && bytes[9] === 0xff && zero(10, 12)) return quad(12);
  // Compatible form; :: and ::1 are IPv6's own unspecified and loopback addresses.
  if (zero(0, 12) && !(zero(12, 15) && bytes[15]! <= 1)) return quad(12);
  // A local-use prefix shorter than /96 (another RFC 6052 layout) is the gateway's choice, unknown here.
  if (bytes.readUInt32BE(0) === 0x0064ff9b && (zero(4, 12) || bytes.readUInt16BE(4) === 1)) return quad(12);
  if (bytes.readUInt16BE(0) === 0x2002) return quad(2);
  return undefined;
}

function ipv6Bytes(text: string): Buffer | undefined {
  if (isIP(text) !== 6) return undefined;
  let address = text.replace(/%.*$/, '');
  const dotted = /(\d+\.\d+\.\d+\.\d+)$/.exec(address);
  if (dotted) {
    const [a, b, c, d] = dotted[1]!.split('.').map(Number) as [number, number, number, number];
    address = `${address.slice(0, dotted.index)}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  const [head, tail] = address.includes('::') ? address.split('::') : [address, undefined];
  const headGroups = head ? head.split(':') : [];
  const tailGroups = tail ? tail.split(':') : [];
  const groups =
    tail === undefined
      ? headGroups
      : [...headGroups, ...Array<string>(8 - headGroups.length - tailGroups.length).fill('0'), ...tailGroups];
  const bytes = Buffer.alloc(16);
  groups.forEach((g, i) => bytes.writeUInt16BE(parseInt(g, 16), i * 2));
  return bytes;
}

/** Why a receiver may not be reached at this IP address, or undefined when it may. */
export function addressProblem(address: string, allow: readonly ReceiverAllowance[]): string | undefined {
  const family = isIP(address);
  if (family === 0) return `${address} is not an IP address`;
  const v4 = family === 6 ? embeddedIPv4(address) : undefined;
  if (v4 !== undefined) {
    const inner = addressProblem(v4, allow);
    return inner && `${address} carries ${inner}`;
  }
  const type = family === 4 ? 'ipv4' : 'ipv6';
  if (NEVER.check(address, type))
    return `${address} is a link-local, metadata, reserved or non-unicast address (never allowed)`;
  for (const [range, list] of [
    ['loopback', LOOPBACK],
    ['private', PRIVATE],
  ] as const) {
    if (list.check(address, type) && !allow.includes(range)) {
      return `${address} is a ${range} address (allowed only when TOKENWARDEN_RECEIVER_ALLOW includes ${range})`;
    }
  }
  return undefined;
}

/** A host as the URL parser gives it, without IPv6 brackets or a trailing dot. */
const bareHost = (url: URL): string => url.hostname.replace(/^\[(.*)\]$/, '$1').replace(/\.$/, '');

/**
 * Characters the URL parser drops or that show other than they read: controls (C0, DEL, C1, tab and
 * LF vanish silently), whitespace, and invisible formatting (soft hyphen, zero-width, bidi controls).
 */
const UNSEEN_IN_URL = /[\p{Cc}\p{Cf}\p{Z}]/u;

/**
 * What an error may say of text that is not an http(s) URL: its length and, when it has one, its
 * http(s) scheme. Never the rest: user info that stops the parser (`user:pa/ss@host`) cannot be masked.
 */
function notHttp(text: string): string {
  const scheme = /^https?:\/\//i.exec(text)?.[0];
  const start = scheme ? ` starting "${scheme}"` : ', not starting with http:// or https://';
  return `expected an http(s) URL (got ${text.length} characters${start})`;
}

/**
 * Checks a receiver URL without touching the network: syntax, scheme, length, credentials, literal
 * addresses (in every spelling the URL parser accepts: `http://2130706433/` is 127.0.0.1) and
 * metadata service names. Returns the parsed URL (its `href` is the form to store) or why it is refused.
 */
export function checkReceiverUrl(
  text: string,
  allow: readonly ReceiverAllowance[],
): { url: URL; problem?: undefined } | { url?: undefined; problem: string } {
  if (text.length > MAX_RECEIVER_URL_LENGTH) {
    return { problem: `at most ${MAX_RECEIVER_URL_LENGTH} characters, got ${text.length}` };
  }
  const unseen = UNSEEN_IN_URL.exec(text);
  if (unseen) {
    return {
      problem: `must not contain control, whitespace or invisible formatting characters (found ${codePoint(unseen[0])})`,
    };
  }
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    return { problem: notHttp(text) };
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') return { problem: notHttp(text) };
  if (url.username || url.password) {
    return { problem: 'credentials in the URL are not accepted: it is stored and shown in plain text' };
  }
  const host = bareHost(url);
  if (METADATA_NAMES.includes(host)) return { problem: `${host} is a cloud metadata service (never allowed)` };
  if (isIP(host)) {
    const problem = addressProblem(host, allow);
    if (problem) return { problem };
  }
  return { url };
}

/**
 * Resolves the URL's host (every address it has) and refuses it when any address is forbidden:
 * one forbidden answer among several would otherwise be reached by chance. `signal` bounds the
 * wait (getaddrinfo itself has no deadline).
 */
export async function resolveReceiver(
  url: URL,
  allow: readonly ReceiverAllowance[],
  signal: AbortSignal,
): Promise<{ addresses: LookupAddress[]; problem?: undefined } | { addresses?: undefined; problem: string }> {
  const host = bareHost(url);
  const addresses = isIP(host)
    ? [{ address: host, family: isIP(host) }]
    : await new Promise<LookupAddress[]>((resolve, reject) => {
        signal.throwIfAborted();
        const abort = () => reject(signal.reason as Error);
        signal.addEventListener('abort', abort, { once: true });
        lookup(host, { all: true })
          .then(resolve, reject)
          .finally(() => signal.removeEventListener('abort', abort));
      });
  for (const { address } of addresses) {
    const problem = addressProblem(address, allow);
    if (problem) return { problem: `${host} resolves to a forbidden address: ${problem}` };
  }
  return { addresses };
}

/**
 * A `lookup` for node:http that answers with the addresses already checked, so the connection
 * goes where the check looked and a second DNS answer cannot redirect it.
 */
export function pinnedLookup(addresses: readonly LookupAddress[]): LookupFunction {
  return (_hostname, options, callback) => {
    const family = options.family === 'IPv4' ? 4 : options.family === 'IPv6' ? 6 : options.family;
    const usable = family ? addresses.filter((a) => a.family === family) : [...addresses];
    const first = usable[0];
    if (!first) {
      const err: NodeJS.ErrnoException = new Error('no checked address of the requested family');
      err.code = 'ENOTFOUND';
      callback(err, '');
    } else if (options.all) callback(null, usable);
    else callback(null, first.address, first.family);
  };
}
