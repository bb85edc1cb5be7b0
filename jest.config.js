/** @type {import('jest').Config} */
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/test'],
  testMatch: ['**/*.test.ts'],
  transform: {
    '^.+\\.ts$': ['ts-jest', { tsconfig: '<rootDir>/tsconfig.test.json' }],
  },
  // Native work (LibTorch) is heavy on a 2-core machine: run test files one after another.
  maxWorkers: 1,
  reporters: ['default', '<rootDir>/test/helpers/summary-reporter.js'],
  testTimeout: 120000,
};
