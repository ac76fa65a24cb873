//! Reads a curriculum directory into lesson sources for `domain::lessons::catalog::validate`.
//!
//! Every directory directly under the curriculum is a lesson (hidden ones are skipped); within
//! it, `lesson.yaml` and every file under `stageN/` are read. Files elsewhere in the lesson's
//! directory (a README, a diagram) are left alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::domain::lessons::catalog::{self, LESSON_FILE, Lesson, LessonSource, Problem};

/// Why a curriculum could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CurriculumError {
    #[error("cannot read the curriculum directory {dir}")]
    Read {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the curriculum {dir} has {} problem{}: {}", .problems.len(), if .problems.len() == 1 { "" } else { "s" }, catalog::describe(.problems))]
    Invalid {
        dir: PathBuf,
        problems: Vec<Problem>,
    },
}

/// The lessons of `dir`, or every problem with them.
pub fn load(dir: &Path) -> Result<Vec<Lesson>, CurriculumError> {
    let sources = read(dir)?;
    catalog::validate(&sources).map_err(|problems| CurriculumError::Invalid {
        dir: dir.to_owned(),
        problems,
    })
}

/// The files of every lesson of `dir`.
pub fn read(dir: &Path) -> Result<Vec<LessonSource>, CurriculumError> {
    let read_error = |source| CurriculumError::Read {
        dir: dir.to_owned(),
        source,
    };
    let mut sources = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(read_error)?
        .collect::<Result<_, _>>()
        .map_err(read_error)?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        let mut source = LessonSource {
            dir: name,
            files: BTreeMap::new(),
            unreadable: BTreeMap::new(),
        };
        let root = entry.path();
        read_file(&root, LESSON_FILE, &mut source);
        let Ok(children) = std::fs::read_dir(&root) else {
            source
                .unreadable
                .insert(".".into(), "cannot read the lesson's directory".into());
            sources.push(source);
            continue;
        };
        for child in children.flatten() {
            let child_name = child.file_name().to_string_lossy().into_owned();
            if child_name.starts_with("stage") && child.path().is_dir() {
                walk(&root, Path::new(&child_name), &mut source, 0);
            }
        }
        sources.push(source);
    }
    Ok(sources)
}

fn walk(root: &Path, relative: &Path, source: &mut LessonSource, depth: usize) {
    // Stage directories are shallow: `stageN/guide.md`, `stageN/configs/<endpoint>.<ext>`.
    if depth > 3 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(root.join(relative)) else {
        source.unreadable.insert(
            relative.display().to_string(),
            "cannot read this directory".into(),
        );
        return;
    };
    for entry in entries.flatten() {
        let path = relative.join(entry.file_name());
        if entry.path().is_dir() {
            walk(root, &path, source, depth + 1);
        } else {
            read_file(root, &path.to_string_lossy(), source);
        }
    }
}

fn read_file(root: &Path, relative: &str, source: &mut LessonSource) {
    let path = root.join(relative);
    match std::fs::metadata(&path) {
        Ok(meta) if meta.len() > catalog::MAX_FILE as u64 => {
            source.unreadable.insert(
                relative.to_owned(),
                format!(
                    "is {} bytes; the limit is {}",
                    meta.len(),
                    catalog::MAX_FILE
                ),
            );
            return;
        }
        Ok(_) => {}
        // Missing: `validate` says what was expected there.
        Err(_) => return,
    }
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            source.files.insert(relative.to_owned(), text);
        }
        Err(err) => {
            source.unreadable.insert(
                relative.to_owned(),
                format!("cannot be read as text: {err}"),
            );
        }
    }
}
