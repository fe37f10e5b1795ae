// Bundle a JavaScript plugin into one ES module for componentize-js: `import ... from 'flywheel'`
// resolves to the SDK under guest/js; WIT imports (`wasi:...`, `flywheel:...`) stay imports.
// Usage: node bundle-js.mjs <entry.js> <out.js> <sdk-dir>
import { rolldown } from 'rolldown';
import path from 'node:path';

const [entry, out, sdk] = process.argv.slice(2);
const bundle = await rolldown({
  input: entry,
  external: [/^wasi:/, /^flywheel:/],
  resolve: { alias: { flywheel: path.resolve(sdk, 'index.js') } },
});
await bundle.write({ file: out, format: 'esm' });
await bundle.close();
