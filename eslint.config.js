// @ts-check
import js from '@eslint/js';
import tseslint from 'typescript-eslint';
import { builtinModules } from 'node:module';

const nodeBuiltins = [...builtinModules, ...builtinModules.map((m) => `node:${m}`)].filter(
  // The workflow sandbox allows these three.
  (m) => !['assert', 'url', 'util', 'node:assert', 'node:url', 'node:util'].includes(m),
);

export default tseslint.config(
  { ignores: ['dist/', 'node_modules/', '.data/', 'test/histories/'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    files: ['**/*.ts'],
    languageOptions: { parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname } },
    rules: {
      '@typescript-eslint/no-floating-promises': [
        'error',
        // node:test's describe/it return promises the runner itself awaits.
        { allowForKnownSafeCalls: [{ from: 'package', package: 'node:test', name: ['describe', 'it', 'test'] }] },
      ],
      '@typescript-eslint/no-misused-promises': 'error',
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_' }],
    },
  },
  {
    // Workflow code runs in Temporal's deterministic sandbox: no I/O, no clock or randomness of
    // Node's, no zod (schemas would be re-instantiated per cached workflow).
    files: [
      'workflows/**/*.ts',
      'common/names.ts',
      'common/durations.ts',
      'common/text.ts',
      'common/messages.ts',
      'bench/floor-workflows.ts',
      'test/support/wedging-workflows.ts',
    ],
    rules: {
      'no-restricted-imports': [
        'error',
        {
          paths: [
            ...nodeBuiltins.map((name) => ({ name, message: 'Node built-ins are not available in workflow code.' })),
            { name: 'zod', message: 'No zod in workflow code: use the hand-written checks in lifecycle-state.ts.' },
            { name: 'pg', message: 'Workflow code does no I/O: call an activity.' },
            { name: '@temporalio/activity', message: 'Not in workflow code.' },
            { name: '@temporalio/client', message: 'Not in workflow code.' },
            { name: '@temporalio/worker', message: 'Not in workflow code.' },
          ],
          patterns: [
            {
              group: [
                '**/activities/*',
                '**/client/*',
                '**/worker/*',
                '**/common/store*',
                '**/common/secrets*',
                '**/common/config*',
                '**/common/db*',
                '**/common/temporal*',
              ],
              allowTypeImports: true,
              message: 'Workflow code may only import types from I/O modules.',
            },
          ],
        },
      ],
    },
  },
  { files: ['**/*.js'], languageOptions: { globals: { process: 'readonly', URL: 'readonly' } } },
);
