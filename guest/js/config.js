// The plugin manifest's `[config]` values, which the host passes as environment variables.
import { getEnvironment } from 'wasi:cli/environment@0.2.12';

/** All `[config]` values, as an object. */
export function allConfig() {
  return Object.fromEntries(getEnvironment());
}

/** One `[config]` value, or `fallback` when the manifest does not set it. */
export function config(name, fallback = null) {
  for (const [k, v] of getEnvironment()) if (k === name) return v;
  return fallback;
}
