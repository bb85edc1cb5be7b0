#!/usr/bin/env node
'use strict';
// A closed pipe (customdiff doctor | head) is a normal way for a reader to stop, not an error.
process.stdout.on('error', (e) => {
  if (e && e.code === 'EPIPE') process.exit(0);
  throw e;
});
require('../lib/cli/main.js').main(process.argv).then(
  (code) => {
    process.exitCode = code;
  },
  (e) => {
    process.stderr.write(`customdiff: ${e && e.message ? e.message : e}\n`);
    process.exitCode = 1;
  },
);
